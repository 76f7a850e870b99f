"""Migration 10: cancellations and stripe corrections."""

from __future__ import annotations

from consumer.store.migrations._sql import DEDUP, USAGE_VIEWS, Step, rollup_view, totals_view

# A window whose events were all cancelled is a zero row: people never see it.
_LIVE_WINDOWS = "(SELECT * FROM usage_windows FINAL WHERE event_count > 0)"

NUMBER = 10
NAME = "cancellations and stripe corrections"
STEPS: list[Step] = [
    # Cancel events, keyed by what they cancel (meter, customer, event id): a repeated
    # cancel converges; one that arrives before its original still wins.
    f"""CREATE TABLE IF NOT EXISTS cancellations (
        meter LowCardinality(String),
        customer_id String,
        cancelled_id String,
        event_id String,
        event_time DateTime64(3, 'UTC'),
        topic LowCardinality(String),
        partition UInt32,
        offset UInt64,
        record_time DateTime64(3, 'UTC')
    ) ENGINE = ReplacingMergeTree
    ORDER BY (meter, customer_id, cancelled_id)
    SETTINGS {DEDUP}""",
    # What taking cancelled usage back from Stripe came to, per cancelled event
    # (per_event) or per bucket (aggregated, cancelled_id ''); the latest row wins.
    # outcome: adjusted (cancelled at Stripe), unsent (never billed), late (Stripe
    # still bills `value`: past 24 hours or refused; a person decides), held (the
    # usage is in rejected or expired pushes, which are not billed).
    """CREATE TABLE IF NOT EXISTS stripe_corrections (
        meter LowCardinality(String),
        customer_id String,
        bucket_start DateTime64(3, 'UTC'),
        cancelled_id String,
        mode LowCardinality(String),
        outcome LowCardinality(String),
        value Decimal(38, 9),
        identifiers Array(String),
        reason String,
        updated_at DateTime64(3, 'UTC')
    ) ENGINE = ReplacingMergeTree(updated_at)
    ORDER BY (meter, customer_id, bucket_start, cancelled_id)""",
    """CREATE OR REPLACE VIEW usage_minutely AS
        SELECT meter, customer_id, window_start, sum_value, event_count, min_value, max_value,
               first_value, last_value, toDecimal128(sum_value / event_count, 9) AS avg_value
        FROM usage_windows FINAL WHERE event_count > 0""",
    *(
        rollup_view(name, expr, col, "CREATE OR REPLACE VIEW", _LIVE_WINDOWS)
        for name, expr, col in USAGE_VIEWS
    ),
    totals_view("CREATE OR REPLACE VIEW", _LIVE_WINDOWS),
    """CREATE OR REPLACE VIEW stripe_delivery AS
        SELECT identifier, mode, meter, customer_id, bucket_start, stripe_timestamp, value,
               multiIf(status_rank IN (2, 6), 'sent', status_rank = 7, 'rejected',
                       status_rank = 4, 'expired', status_rank = 8, 'cancelled',
                       'pending') AS status,
               stripe_timestamp != bucket_start AS redated, reason, first_attempt_at, updated_at,
               ifNull(sent_value, value) AS billed
        FROM stripe_pushes FINAL""",
]
