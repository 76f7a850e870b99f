"""Migration 3: side outputs."""

from __future__ import annotations

from consumer.store.migrations._sql import DEDUP, Step

NUMBER = 3
NAME = "side outputs"
STEPS: list[Step] = [
    f"""CREATE TABLE IF NOT EXISTS dead_letters (
            topic String,
            partition UInt32,
            offset UInt64,
            reason LowCardinality(String),
            detail String,
            key String,
            payload String,
            record_time DateTime64(3, 'UTC'),
            written_at DateTime64(3, 'UTC')
        ) ENGINE = ReplacingMergeTree
        ORDER BY (topic, partition, offset)
        SETTINGS {DEDUP}""",
    f"""CREATE TABLE IF NOT EXISTS late_events (
            topic String,
            partition UInt32,
            offset UInt64,
            meter LowCardinality(String),
            customer_id String,
            event_id String,
            event_time DateTime64(3, 'UTC'),
            value Decimal(38, 9),
            watermark DateTime64(3, 'UTC'),
            record_time DateTime64(3, 'UTC')
        ) ENGINE = ReplacingMergeTree
        ORDER BY (topic, partition, offset)
        SETTINGS {DEDUP}""",
]
