"""Migration 4: stripe outbox."""

from __future__ import annotations

from consumer.store.migrations._sql import DEDUP, Step

NUMBER = 4
NAME = "stripe outbox"
STEPS: list[Step] = [
    # Push intents and their marks; identity = the Stripe identifier; `status_rank`
    # makes `sent` win over `pending` under FINAL, whatever the write order.
    f"""CREATE TABLE IF NOT EXISTS stripe_pushes (
            identifier String,
            mode LowCardinality(String),
            meter LowCardinality(String),
            stripe_event_name String,
            customer_id String,
            bucket_start DateTime64(3, 'UTC'),
            revision UInt32,
            value Decimal(38, 9),
            status_rank UInt8,
            first_attempt_at DateTime64(3, 'UTC'),
            updated_at DateTime64(3, 'UTC')
        ) ENGINE = ReplacingMergeTree(status_rank)
        ORDER BY (identifier)
        SETTINGS {DEDUP}""",
]
