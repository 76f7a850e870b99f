"""Migration 25: the ledger records the topic incarnation each row came from."""

from __future__ import annotations

from consumer.store.migrations._sql import Step

# What rows written before this migration read: not a topic id (Kafka's are 22 characters
# of base64, and '' is what a consumer that does not tell incarnations apart writes), so
# such a row never matches a range's own incarnation and always counts as a copy in the
# dedup question (sinks/ledger.py): a row of a deleted topic's incarnation can no longer be
# taken for the re-created topic's own write at the same partition and offset (P2).
UNRECORDED = "(unrecorded)"

NUMBER = 25
NAME = "ledger topic id"
STEPS: list[Step] = [
    f"ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS topic_id String DEFAULT '{UNRECORDED}'",
]
