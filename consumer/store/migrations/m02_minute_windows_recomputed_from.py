"""Migration 2: minute windows recomputed from the ledger."""

from __future__ import annotations

from consumer.store.migrations._sql import DEDUP, Step

NUMBER = 2
NAME = "minute windows recomputed from the ledger"
STEPS: list[Step] = [
    # Set semantics: each row is a recomputation from the ledger; the last insert wins.
    f"""CREATE TABLE IF NOT EXISTS usage_windows (
            meter LowCardinality(String),
            customer_id String,
            window_start DateTime('UTC'),
            sum_value Decimal(38, 9),
            event_count UInt64,
            min_value Decimal(38, 9),
            max_value Decimal(38, 9),
            first_value Decimal(38, 9),
            first_time DateTime64(3, 'UTC'),
            last_value Decimal(38, 9),
            last_time DateTime64(3, 'UTC'),
            computed_at DateTime64(3, 'UTC')
        ) ENGINE = ReplacingMergeTree
        ORDER BY (meter, customer_id, window_start)
        SETTINGS {DEDUP}""",
    # Which windows a batch touched, so the recompute reads only those ledger slices.
    # Expires by insert time: a window's own age says nothing about when it is needed.
    """CREATE TABLE IF NOT EXISTS dirty_windows (
            batch_id String,
            meter LowCardinality(String),
            customer_id String,
            window_start DateTime('UTC'),
            inserted_at DateTime('UTC') DEFAULT now()
        ) ENGINE = MergeTree
        ORDER BY (batch_id, meter, customer_id, window_start)
        TTL inserted_at + INTERVAL 1 DAY""",
]
