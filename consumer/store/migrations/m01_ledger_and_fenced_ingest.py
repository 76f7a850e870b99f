"""Migration 1: ledger and fenced ingest state."""

from __future__ import annotations

from consumer.store.migrations._sql import DEDUP, Step

NUMBER = 1
NAME = "ledger and fenced ingest state"
STEPS: list[Step] = [
    # The deduplicated ledger: one row per accepted event. Identity (meter, customer,
    # hour, event id); `ver` prefers the copy with the earliest record timestamp.
    f"""CREATE TABLE IF NOT EXISTS usage_events (
            meter LowCardinality(String),
            customer_id String,
            event_id String,
            event_time DateTime64(3, 'UTC'),
            value Decimal(38, 9),
            properties Map(String, String),
            schema_id UInt32,
            topic LowCardinality(String),
            partition UInt32,
            offset UInt64,
            record_time DateTime64(3, 'UTC'),
            ver UInt64,
            INDEX event_id_bf event_id TYPE bloom_filter(0.01) GRANULARITY 4
        ) ENGINE = ReplacingMergeTree(ver)
        ORDER BY (meter, customer_id, toStartOfHour(event_time), event_id)
        SETTINGS {DEDUP}""",
    # Versioned intent/done rows per (group, topic, partition); read with argMax (P4).
    """CREATE TABLE IF NOT EXISTS ingest_state (
            group_id String,
            topic String,
            partition UInt32,
            range_start Int64,
            range_end Int64,
            state_rank UInt8,
            epoch UInt64,
            attempt UInt32,
            snapshot String,
            written_at DateTime64(3, 'UTC')
        ) ENGINE = MergeTree
        ORDER BY (group_id, topic, partition, range_start, state_rank)""",
]
