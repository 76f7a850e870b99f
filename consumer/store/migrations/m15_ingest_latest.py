"""Migration 15: the latest ingest state of each partition, kept apart from the history."""

from __future__ import annotations

from consumer.store.migrations._sql import Step

# Assignment reads each partition's latest state. Read from `ingest_state` (two rows a
# range, every range ever) that read grew with the partition's age: 16 ms at 500,000 rows,
# 125 ms at 8,000,000. `ingest_latest` keeps one row a partition: a materialized view copies
# every state row into it as it is inserted, and the replacing merge keeps the row that wins
# the order P4 reads by (range start, rank, epoch, written at), packed into one version.
# Until merges run a key may hold a few rows, so readers still take argMax of the version.
# Bits: range start (an offset, < 2^63) from 130, rank (< 4) from 128, epoch (UInt64) from
# 64, written at (ms) from 0: 193 of the version's 256, each field in its own.
VERSION = (
    "bitShiftLeft(toUInt256(range_start), 130) + bitShiftLeft(toUInt256(state_rank), 128) "
    "+ bitShiftLeft(toUInt256(epoch), 64) + toUInt256(toUnixTimestamp64Milli(written_at))"
)
_COLUMNS = (
    "group_id, topic, partition, topic_id, range_start, range_end, state_rank, epoch, "
    "attempt, snapshot, written_at"
)

NUMBER = 15
NAME = "latest ingest state per partition"
STEPS: list[Step] = [
    """CREATE TABLE IF NOT EXISTS ingest_latest (
        group_id String,
        topic String,
        partition UInt32,
        topic_id String,
        range_start Int64,
        range_end Int64,
        state_rank UInt8,
        epoch UInt64,
        attempt UInt32,
        snapshot String,
        written_at DateTime64(3, 'UTC'),
        version UInt256
    ) ENGINE = ReplacingMergeTree(version)
    ORDER BY (group_id, topic, partition, topic_id)""",
    f"""CREATE MATERIALIZED VIEW IF NOT EXISTS ingest_latest_mv TO ingest_latest AS
        SELECT {_COLUMNS}, {VERSION} AS version FROM ingest_state""",
    # The state written before this migration: each key's winning row (a re-run adds the
    # same rows again, which the merge collapses).
    f"""INSERT INTO ingest_latest ({_COLUMNS}, version)
        SELECT {_COLUMNS}, {VERSION} AS version FROM ingest_state
        ORDER BY version DESC LIMIT 1 BY group_id, topic, partition, topic_id""",
]
