"""What to send: the outbox of pushes, buckets, whole units, identifiers, Connect accounts."""
