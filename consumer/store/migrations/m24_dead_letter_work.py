"""Migration 24: dead letters an operator can work with.

A dead letter keeps its message's headers, so a re-driven copy that fails again names the
dead letter it came from (`usage-consumer.redrive-of`). `dlq_redrives` records every
re-drive of a dead letter (intended before the produce, sent with the copy's offset after
it), so a re-run skips what was sent and a killed run resumes. `dlq_releases` records the
offset ranges an operator let through the dead-letter flood stop.
"""

from __future__ import annotations

from consumer.store.migrations._sql import Step

NUMBER = 24
NAME = "dead letter work"
STEPS: list[Step] = [
    """ALTER TABLE dead_letters
        ADD COLUMN IF NOT EXISTS header_keys Array(String),
        ADD COLUMN IF NOT EXISTS header_values Array(String)""",
    # `dlq` reads a time window: the month partitions bound it, and within a month this
    # index skips the granules outside it (a partition's offsets follow its record times).
    """ALTER TABLE dead_letters
        ADD INDEX IF NOT EXISTS by_record_time record_time TYPE minmax GRANULARITY 1""",
    "ALTER TABLE dead_letters MATERIALIZE INDEX by_record_time SETTINGS mutations_sync = 1",
    # One row per (dead letter, re-drive run, state); the newest state of a run wins.
    """CREATE TABLE IF NOT EXISTS dlq_redrives (
        topic String,
        partition UInt32,
        offset UInt64,
        redrive_id String,
        state UInt8,
        reason LowCardinality(String),
        copy_partition Int32,
        copy_offset Int64,
        who String,
        at DateTime64(3, 'UTC')
    ) ENGINE = ReplacingMergeTree
    PARTITION BY toYYYYMM(at)
    ORDER BY (topic, partition, offset, redrive_id, state)""",
    """CREATE TABLE IF NOT EXISTS dlq_releases (
        topic String,
        partition UInt32,
        first_offset UInt64,
        last_offset UInt64,
        reason String,
        who String,
        released_at DateTime64(3, 'UTC')
    ) ENGINE = ReplacingMergeTree
    ORDER BY (topic, partition, first_offset, last_offset)""",
]
