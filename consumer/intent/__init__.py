"""A range's life: its intent and snapshot, the fenced state rows, the poison search, and the
numbered commit sequence that makes its effects durable before its offset is committed."""
