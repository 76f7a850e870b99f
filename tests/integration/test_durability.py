"""`clickhouse.fsync_after_insert` (P8): set on every MergeTree table, and billing runs with it.

ClickHouse knows `fsync_after_insert` only as a table setting: passed with an insert (as the
backends once did) every insert failed with UNKNOWN_SETTING, so the option stopped the
consumer the moment it was switched on.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from consumer.local.broker import TansuBroker
from consumer.local.demo import produce, run_until_drained, stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.local.sample import generate
from consumer.ops.totals import clickhouse_totals
from consumer.store import Backend, open_store
from consumer.store.chdb import ChdbBackend
from consumer.store.durability import SETTINGS, apply_fsync
from consumer.store.migrations import migrate
from tests.integration.conftest import make_settings
from tests.integration.test_pipeline import ours

pytestmark = pytest.mark.integration


def fsync_by_table(store: Backend) -> dict[str, bool]:
    """Each MergeTree table of the database: whether both fsync settings are on."""
    rows = store.query(
        """SELECT name, create_table_query FROM system.tables
           WHERE database = currentDatabase() AND engine LIKE '%MergeTree'"""
    )
    return {str(n): all(f"{s} = 1" in str(ddl) for s in SETTINGS) for n, ddl in rows}


def test_fsync_is_set_on_every_table_and_taken_back(tmp_path: Path) -> None:
    store = ChdbBackend(tmp_path / "chdb", "usage")
    try:
        migrate(store)
        tables = fsync_by_table(store)
        assert "usage_events" in tables and "stripe_pushes" in tables
        assert not any(tables.values())

        assert sorted(apply_fsync(store, True)) == sorted(tables)
        assert all(fsync_by_table(store).values())
        assert apply_fsync(store, True) == []  # nothing left to change
        store.command(
            "INSERT INTO schema_migrations (version, name) VALUES (999, 'fsynced insert')"
        )
        assert store.query("SELECT name FROM schema_migrations WHERE version = 999")

        assert sorted(apply_fsync(store, False)) == sorted(tables)
        assert not any(fsync_by_table(store).values())
    finally:
        store.close()


def test_billing_with_fsync_on_equals_ground_truth(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings = make_settings(
        broker, emulator, tmp_path, unique, clickhouse={"fsync_after_insert": True}
    )
    k = settings.kafka
    broker.create_topics({k.topic: 2, k.dlq_topic: 1, k.late_topic: 1})
    prefix = f"cus_{unique}_"
    sample = generate(4_000, 6, 2, int(time.time() * 1000), seed=5, customer_prefix=prefix)
    run_until_drained(settings, produce(sample, broker.bootstrap, k.topic), timeout=180, quiet=True)
    store = open_store(settings.clickhouse)
    try:
        assert all(fsync_by_table(store).values())
        assert ours(clickhouse_totals(store, settings.meters), prefix) == sample.truth
    finally:
        store.close()
    assert ours(stripe_totals(settings, emulator.url), prefix) == sample.truth
