"""Migration 8: ingest_state topic id."""

from __future__ import annotations

from consumer.store.migrations._sql import Step

NUMBER = 8
NAME = "ingest_state topic id"
STEPS: list[Step] = [
    # The topic's incarnation: state of a deleted topic never steers its re-created
    # namesake ('' = written before ids were recorded, read as the current one).
    "ALTER TABLE ingest_state ADD COLUMN IF NOT EXISTS topic_id String DEFAULT ''",
]
