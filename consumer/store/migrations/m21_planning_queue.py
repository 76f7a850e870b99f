"""Migration 21: the windows still to plan, and the outbox's aggregated pushes by bucket."""

from __future__ import annotations

from consumer.store.migrations._sql import Step

# Every emitter cycle asked each aggregated meter's 35 days of windows and every aggregated
# push whether a bucket's total had moved: a read that grew with the store. The rollup now
# names each window it recomputes in `planning_queue` (after the window row is written),
# the corrections name each bucket whose pushes they cancel, and the emitter plans those
# buckets only, then records the names as planned with the version it read: a name written
# again meanwhile has a later version and stays to plan (consumer/emitter/plan/queue.py).
#
# The outbox is keyed by identifier (a hash), so a bucket's pushes are found through a
# projection ordered by (meter, customer, bucket); ClickHouse keeps it with every insert
# and rebuilds it in replacing merges. Reads through it see every version of a push and
# pick its newest themselves, as FINAL would.
NUMBER = 21
NAME = "planning queue"
STEPS: list[Step] = [
    """CREATE TABLE IF NOT EXISTS planning_queue (
        meter LowCardinality(String),
        customer_id String,
        window_start DateTime('UTC'),
        version DateTime64(9, 'UTC'),
        planned UInt8
    ) ENGINE = ReplacingMergeTree(version)
    ORDER BY (meter, customer_id, window_start)""",
    "ALTER TABLE stripe_pushes MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild'",
    """ALTER TABLE stripe_pushes ADD PROJECTION IF NOT EXISTS by_bucket (
        SELECT identifier, mode, meter, customer_id, bucket_start, revision, value,
               status_rank
        ORDER BY meter, customer_id, bucket_start)""",
    "ALTER TABLE stripe_pushes MATERIALIZE PROJECTION by_bucket SETTINGS mutations_sync = 1",
    # What was written before this migration was planned by whole reads: the first cycle
    # after it does one more such read (this name, meter '', stands for every window).
    """INSERT INTO planning_queue (meter, customer_id, window_start, version, planned)
        VALUES ('', '', toDateTime(0, 'UTC'), now64(9, 'UTC'), 0)""",
]
