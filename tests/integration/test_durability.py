"""`clickhouse.fsync_after_insert` (P8): set on every MergeTree table, and billing runs with it.

ClickHouse knows `fsync_after_insert` only as a table setting: passed with an insert (as the
backends once did) every insert failed with UNKNOWN_SETTING, so the option stopped the
consumer the moment it was switched on.
"""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

import pytest

from consumer.local.broker import TansuBroker
from consumer.local.demo import produce, run_until_drained, stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.local.sample import generate
from consumer.ops.totals import clickhouse_totals
from consumer.sinks.ledger import partitions_with_rows
from consumer.store import Backend, open_store
from consumer.store.chdb import ChdbBackend
from consumer.store.durability import SETTINGS, apply_fsync
from consumer.store.migrations import migrate
from tests.integration.conftest import ledger_totals, make_settings
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


def test_a_partition_whose_state_was_lost_is_read_again_not_resumed_from_kafka(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    """A host crash with fsync_after_insert off lost partition 0's newest parts: all of its
    ingest state and its last ledger rows, while Kafka had committed past them. The next
    owner finds ledger rows but no state, and re-reads the partition from the start of what
    Kafka retains instead of resuming at the committed offset: the lost rows are written
    again, and nothing is billed twice."""
    settings = make_settings(broker, emulator, tmp_path, unique)
    k = settings.kafka
    broker.create_topics({k.topic: 2, k.dlq_topic: 1, k.late_topic: 1})
    prefix = f"cus_{unique}_"
    now = int(time.time() * 1000)
    first = generate(600, 6, 2, now, seed=31, customer_prefix=prefix)
    ends = produce(first, broker.bootstrap, k.topic)
    run_until_drained(settings, ends, timeout=120, quiet=True)

    store = open_store(settings.clickhouse)
    try:
        lost = ends[0] // 2  # partition 0's ledger rows from this offset on are gone too
        for table, where in (
            ("ingest_state", "partition = 0"),
            ("ingest_latest", "partition = 0"),
            ("usage_events", f"partition = 0 AND offset >= {lost}"),
        ):
            store.command(f"ALTER TABLE {table} DELETE WHERE {where} SETTINGS mutations_sync = 2")
        assert partitions_with_rows(store, k.topic, _topic_id(store), [0, 1]) == {0, 1}
    finally:
        store.close()

    # the next start, with more data on both partitions (in the last minutes: never late)
    later = generate(100, 6, 2, now, seed=32, span_ms=5 * 60_000, customer_prefix=prefix)
    more = produce(later, broker.bootstrap, k.topic)
    run_until_drained(settings, more, timeout=120, quiet=True)

    truth = {
        key: first.truth.get(key, Decimal(0)) + later.truth.get(key, Decimal(0))
        for key in set(first.truth) | set(later.truth)
        if key[1] != "storage_gb"  # a `last` meter: totals of two samples don't add
    }
    store = open_store(settings.clickhouse)
    try:
        ledger = ledger_totals(store, settings.meters, prefix)
        windows = clickhouse_totals(store, settings.meters)
    finally:
        store.close()
    assert {key: v for key, v in ledger.items() if key in truth} == truth
    assert {key: v for key, v in ours(windows, prefix).items() if key in truth} == truth
    billed = ours(stripe_totals(settings, emulator.url), prefix)
    assert {key: v for key, v in billed.items() if key in truth} == truth


def _topic_id(store: Backend) -> str:
    (row,) = store.query("SELECT DISTINCT topic_id FROM usage_events")
    return str(row[0])
