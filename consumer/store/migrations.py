"""The ClickHouse schema as numbered migrations, applied in order and recorded.

Every table is keyed by a deterministic identity (P3): writing the same rows twice
converges under FINAL. Analysts read the views at the end, never the raw tables.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from consumer.store.backend import Backend

log = logging.getLogger(__name__)
# A statement, or a step that must look before it acts (a copy that may have been cut short).
Step = str | Callable[[Backend], None]

_DEDUP = "non_replicated_deduplication_window = 1000"


def _rollup_view(
    name: str,
    grain: str,
    column: str,
    create: str = "CREATE VIEW IF NOT EXISTS",
    source: str = "usage_windows FINAL",
) -> str:
    """Hour, day and month views derive from the minute windows the same way."""
    return f"""{create} {name} AS
        SELECT meter, customer_id, {grain} AS {column},
               sum(sum_value) AS sum_value, sum(event_count) AS event_count,
               min(min_value) AS min_value, max(max_value) AS max_value,
               argMin(first_value, first_time) AS first_value,
               argMax(last_value, last_time) AS last_value
        FROM {source} GROUP BY meter, customer_id, {column}"""


def _totals_view(create: str, source: str) -> str:
    return f"""{create} usage_totals AS
        SELECT meter, customer_id,
               sum(sum_value) AS sum_value, sum(event_count) AS event_count,
               min(min_value) AS min_value, max(max_value) AS max_value,
               argMin(first_value, first_time) AS first_value,
               argMax(last_value, last_time) AS last_value,
               min(window_start) AS first_window, max(window_start) AS last_window
        FROM {source} GROUP BY meter, customer_id"""


_USAGE_VIEWS = [
    ("usage_hourly", "toStartOfHour(window_start)", "hour"),
    ("usage_daily", "toDate(window_start)", "day"),
    ("usage_monthly", "toStartOfMonth(window_start)", "month"),
]


MIGRATIONS: list[tuple[int, str, list[Step]]] = [
    (
        1,
        "ledger and fenced ingest state",
        [
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
        SETTINGS {_DEDUP}""",
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
        ],
    ),
    (
        2,
        "minute windows recomputed from the ledger",
        [
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
        SETTINGS {_DEDUP}""",
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
        ],
    ),
    (
        3,
        "side outputs",
        [
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
        SETTINGS {_DEDUP}""",
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
        SETTINGS {_DEDUP}""",
        ],
    ),
    (
        4,
        "stripe outbox",
        [
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
        SETTINGS {_DEDUP}""",
        ],
    ),
    (
        5,
        "analyst views",
        [
            """CREATE VIEW IF NOT EXISTS usage_minutely AS
        SELECT meter, customer_id, window_start, sum_value, event_count, min_value, max_value,
               first_value, last_value,
               if(event_count = 0, 0, toDecimal128(sum_value / event_count, 9)) AS avg_value
        FROM usage_windows FINAL""",
            *(_rollup_view(name, expr, col) for name, expr, col in _USAGE_VIEWS),
            _totals_view("CREATE VIEW IF NOT EXISTS", "usage_windows FINAL"),
        ],
    ),
]


MIGRATIONS.append(
    (
        6,
        "classification configs by hash",
        [
            # The configuration each intent's hash names, so a range re-formed after a config
            # change is classified exactly as its first attempt was (P1).
            """CREATE TABLE IF NOT EXISTS config_versions (
        config_hash String,
        body String,
        written_at DateTime64(3, 'UTC') DEFAULT now64(3)
    ) ENGINE = ReplacingMergeTree
    ORDER BY config_hash""",
        ],
    )
)

MIGRATIONS.append(
    (
        7,
        "stripe delivery truth",
        [
            # The timestamp actually sent (differs from bucket_start only when re-dated inside
            # Stripe's 35-day limit) and why a push was rejected, held, confirmed or re-dated.
            """ALTER TABLE stripe_pushes ADD COLUMN IF NOT EXISTS
        stripe_timestamp DateTime64(3, 'UTC') DEFAULT bucket_start""",
            "ALTER TABLE stripe_pushes ADD COLUMN IF NOT EXISTS reason String DEFAULT ''",
            # Every push with its delivery status by name (ranks: consumer/emitter/plan/outbox.py).
            """CREATE VIEW IF NOT EXISTS stripe_delivery AS
        SELECT identifier, mode, meter, customer_id, bucket_start, stripe_timestamp, value,
               multiIf(status_rank IN (2, 6), 'sent', status_rank = 7, 'rejected',
                       status_rank = 4, 'expired', 'pending') AS status,
               stripe_timestamp != bucket_start AS redated, reason, first_attempt_at, updated_at
        FROM stripe_pushes FINAL""",
        ],
    )
)

MIGRATIONS.append(
    (
        8,
        "ingest_state topic id",
        [
            # The topic's incarnation: state of a deleted topic never steers its re-created
            # namesake ('' = written before ids were recorded, read as the current one).
            "ALTER TABLE ingest_state ADD COLUMN IF NOT EXISTS topic_id String DEFAULT ''",
        ],
    )
)

MIGRATIONS.append(
    (
        9,
        "stripe amounts sent, bucket ends and connected accounts",
        [
            # What a push's first send carried (whole numbers carry fractions between pushes,
            # consumer/emitter/plan/units.py); NULL for rows sent exactly before it was recorded.
            """ALTER TABLE stripe_pushes ADD COLUMN IF NOT EXISTS
        sent_value Nullable(Decimal(38, 9)) DEFAULT NULL""",
            # Where an aggregated bucket ends (cut at billing-period anchors); 0 = unknown.
            """ALTER TABLE stripe_pushes ADD COLUMN IF NOT EXISTS
        bucket_end DateTime64(3, 'UTC') DEFAULT toDateTime64(0, 3, 'UTC')""",
            # Stripe Connect: the connected account a push is sent to ('' = the platform).
            "ALTER TABLE stripe_pushes ADD COLUMN IF NOT EXISTS stripe_account String DEFAULT ''",
            # `billed` is what Stripe bills for a sent push; `value` stays the exact usage.
            """CREATE OR REPLACE VIEW stripe_delivery AS
        SELECT identifier, mode, meter, customer_id, bucket_start, stripe_timestamp, value,
               multiIf(status_rank IN (2, 6), 'sent', status_rank = 7, 'rejected',
                       status_rank = 4, 'expired', 'pending') AS status,
               stripe_timestamp != bucket_start AS redated, reason, first_attempt_at, updated_at,
               ifNull(sent_value, value) AS billed
        FROM stripe_pushes FINAL""",
        ],
    )
)


# A window whose events were all cancelled is a zero row: people never see it.
_LIVE_WINDOWS = "(SELECT * FROM usage_windows FINAL WHERE event_count > 0)"

MIGRATIONS.append(
    (
        10,
        "cancellations and stripe corrections",
        [
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
    SETTINGS {_DEDUP}""",
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
                _rollup_view(name, expr, col, "CREATE OR REPLACE VIEW", _LIVE_WINDOWS)
                for name, expr, col in _USAGE_VIEWS
            ),
            _totals_view("CREATE OR REPLACE VIEW", _LIVE_WINDOWS),
            """CREATE OR REPLACE VIEW stripe_delivery AS
        SELECT identifier, mode, meter, customer_id, bucket_start, stripe_timestamp, value,
               multiIf(status_rank IN (2, 6), 'sent', status_rank = 7, 'rejected',
                       status_rank = 4, 'expired', status_rank = 8, 'cancelled',
                       'pending') AS status,
               stripe_timestamp != bucket_start AS redated, reason, first_attempt_at, updated_at,
               ifNull(sent_value, value) AS billed
        FROM stripe_pushes FINAL""",
        ],
    )
)


MIGRATIONS.append(
    (
        11,
        "touched windows come from the batch itself",
        [
            # A batch's windows are derived from its own accepted events when they are
            # recomputed (a retry re-forms the same events), so they are no longer stored.
            "DROP TABLE IF EXISTS dirty_windows",
        ],
    )
)


# The ledger keyed time first: a batch's windows are a few minutes of every customer, so
# their recompute reads those minutes only (keyed customer first, it read every part of the
# table for every batch: 170 ms a batch of 20,000 at 300,000 rows, 9 us an event).
# `id_key` lets the dedup question scan 8 bytes a row instead of every event id string.
LEDGER_ORDER = "meter, toStartOfMinute(event_time), customer_id, event_id"
_LEDGER_REKEYED = f"""CREATE TABLE IF NOT EXISTS usage_events_rekeyed (
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
    id_key UInt64 MATERIALIZED sipHash64(meter, event_id)
) ENGINE = ReplacingMergeTree(ver)
ORDER BY ({LEDGER_ORDER})
SETTINGS {_DEDUP}"""
_LEDGER_COLUMNS = (
    "meter, customer_id, event_id, event_time, value, properties, schema_id, topic, "
    "partition, offset, record_time, ver"
)


def _rekey_ledger(store: Backend) -> None:
    """Copy the ledger into its time-first layout and swap the two atomically. Safe to run
    again after a crash at any point: a finished swap is recognised by its sorting key, an
    unfinished copy is dropped and made again."""
    rows = store.query(
        """SELECT sorting_key FROM system.tables
           WHERE database = currentDatabase() AND name = 'usage_events'"""
    )
    if not rows or str(rows[0][0]) != LEDGER_ORDER:
        (count,) = store.query("SELECT count() FROM usage_events")[0]
        if int(count):
            log.warning("copying the ledger (%s rows) into its time-first layout", count)
        store.command("DROP TABLE IF EXISTS usage_events_rekeyed")
        store.command(_LEDGER_REKEYED)
        store.command(
            f"INSERT INTO usage_events_rekeyed ({_LEDGER_COLUMNS}) "
            f"SELECT {_LEDGER_COLUMNS} FROM usage_events"
        )
        store.command("EXCHANGE TABLES usage_events AND usage_events_rekeyed")
    store.command("DROP TABLE IF EXISTS usage_events_rekeyed")


MIGRATIONS.append((12, "ledger keyed time first, with a dedup key", [_rekey_ledger]))


MIGRATIONS.append(
    (
        13,
        "window jobs",
        [
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
        ],
    )
)


def record_config(store: Backend, config_hash: str, body: str) -> None:
    if not store.query(
        "SELECT 1 FROM config_versions WHERE config_hash = {h:String}", {"h": config_hash}
    ):
        store.command(
            "INSERT INTO config_versions (config_hash, body) VALUES ({h:String}, {b:String})",
            {"h": config_hash, "b": body},
        )


def load_config(store: Backend, config_hash: str) -> str | None:
    rows = store.query(
        "SELECT body FROM config_versions FINAL WHERE config_hash = {h:String}", {"h": config_hash}
    )
    return str(rows[0][0]) if rows else None


def migrate(store: Backend) -> list[int]:
    """Apply pending migrations; returns the versions applied now."""
    store.command(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
        "applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = ReplacingMergeTree "
        "ORDER BY version"
    )
    done = {int(r[0]) for r in store.query("SELECT version FROM schema_migrations FINAL")}
    applied = []
    for version, name, statements in MIGRATIONS:
        if version in done:
            continue
        for step in statements:
            if isinstance(step, str):
                store.command(step)
            else:
                step(store)
        store.command(
            "INSERT INTO schema_migrations (version, name) VALUES ({v:UInt32}, {n:String})",
            {"v": version, "n": name},
        )
        applied.append(version)
    return applied
