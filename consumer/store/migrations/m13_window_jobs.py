"""Migration 13: window jobs."""

from __future__ import annotations

from consumer.store.migrations._sql import Step

NUMBER = 13
NAME = "window jobs"
STEPS: list[Step] = [
    # The windows a batch touched, recorded before its ranges are done and marked
    # done once recomputed (consumer/sinks/rollup.py); a pending one outlives a crash.
    """CREATE TABLE IF NOT EXISTS window_jobs (
        group_id String,
        topic String,
        token String,
        spans Array(Tuple(UInt32, UInt64, UInt64)),
        minutes Array(Tuple(String, DateTime('UTC'))),
        state UInt8,
        written_at DateTime64(3, 'UTC')
    ) ENGINE = ReplacingMergeTree(state)
    ORDER BY (group_id, topic, token)
    TTL toDateTime(written_at) + INTERVAL 7 DAY DELETE WHERE state = 2""",
]
