"""The ClickHouse schema as numbered migrations, one module each (mNN_*.py), applied in
order and recorded in schema_migrations.

Every table is keyed by a deterministic identity (P3): writing the same rows twice
converges under FINAL. Analysts read the views at the end, never the raw tables.
"""

from __future__ import annotations

from consumer.store.backend import Backend
from consumer.store.migrations import (
    m01_ledger_and_fenced_ingest,
    m02_minute_windows_recomputed_from,
    m03_side_outputs,
    m04_stripe_outbox,
    m05_analyst_views,
    m06_classification_configs_by_hash,
    m07_stripe_delivery_truth,
    m08_ingest_state_topic_id,
    m09_stripe_amounts_sent_bucket,
    m10_cancellations_and_stripe_corrections,
    m11_touched_windows_come_from,
    m12_ledger_keyed_time_first,
    m13_window_jobs,
)
from consumer.store.migrations._sql import Step

MIGRATIONS: list[tuple[int, str, list[Step]]] = [
    (m.NUMBER, m.NAME, m.STEPS)
    for m in (
        m01_ledger_and_fenced_ingest,
        m02_minute_windows_recomputed_from,
        m03_side_outputs,
        m04_stripe_outbox,
        m05_analyst_views,
        m06_classification_configs_by_hash,
        m07_stripe_delivery_truth,
        m08_ingest_state_topic_id,
        m09_stripe_amounts_sent_bucket,
        m10_cancellations_and_stripe_corrections,
        m11_touched_windows_come_from,
        m12_ledger_keyed_time_first,
        m13_window_jobs,
    )
]


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
