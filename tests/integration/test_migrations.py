"""Migrations that move data: the ledger's copy into its time-first layout keeps every row
and survives being cut short at any step."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.store.backend import Backend
from consumer.store.chdb import ChdbBackend
from consumer.store.migrations import MIGRATIONS, SCHEMA_MIGRATIONS, migrate
from consumer.store.migrations._sql import table_property
from consumer.store.migrations.m12_ledger_keyed_time_first import LEDGER_ORDER
from consumer.store.migrations.m25_ledger_topic_id import UNRECORDED
from tests.integration.store_wrap import Passthrough

pytestmark = pytest.mark.integration

ROWS = """INSERT INTO usage_events (meter, customer_id, event_id, event_time, value,
                                   properties, topic, partition, offset, record_time, ver)
          SELECT 'm', concat('cus_', toString(number % 7)), concat('e-', toString(number)),
                 fromUnixTimestamp64Milli(toInt64(1700000000000 + number * 1000), 'UTC'),
                 toDecimal128(number, 9), map('k', 'v'), 't', 0, number,
                 fromUnixTimestamp64Milli(toInt64(1700000000000), 'UTC'), 1
          FROM numbers(5000)"""


def _upto(store: Backend, last: int) -> None:
    """The migrations up to `last`, as an older release applied them."""
    store.command(SCHEMA_MIGRATIONS)
    for version, name, steps in MIGRATIONS:
        if version > last:
            break
        for step in steps:
            store.command(step) if isinstance(step, str) else step(store)
        store.command(
            "INSERT INTO schema_migrations (version, name) VALUES ({v:UInt32}, {n:String})",
            {"v": version, "n": name},
        )


def _ledger(store: Backend) -> list[tuple[object, ...]]:
    return store.query(
        """SELECT meter, customer_id, event_id, toUnixTimestamp64Milli(event_time),
                  toString(value), properties['k'], offset, id_key = sipHash64(meter, event_id)
           FROM usage_events ORDER BY event_id"""
    )


def _key(store: Backend) -> str:
    rows = store.query(
        "SELECT sorting_key FROM system.tables "
        "WHERE database = currentDatabase() AND name = 'usage_events'"
    )
    return str(rows[0][0])


@pytest.mark.parametrize("cut", ["none", "after_copy", "after_swap"])
def test_ledger_copy_keeps_every_row_even_when_cut_short(tmp_path: Path, cut: str) -> None:
    store = ChdbBackend(tmp_path / "chdb", "usage")
    try:
        _upto(store, 11)
        store.command(ROWS)
        before = store.query(
            """SELECT meter, customer_id, event_id, toUnixTimestamp64Milli(event_time),
                      toString(value), properties['k'], offset, 1
               FROM usage_events ORDER BY event_id"""
        )
        assert _key(store) != LEDGER_ORDER
        if cut != "none":  # a crash part way: the copy made, maybe swapped, never recorded
            from consumer.store.migrations import m12_ledger_keyed_time_first as migrations

            store.command(migrations._LEDGER_REKEYED)
            store.command(
                f"INSERT INTO usage_events_rekeyed ({migrations._LEDGER_COLUMNS}) "
                f"SELECT {migrations._LEDGER_COLUMNS} FROM usage_events LIMIT 100"
            )
            if cut == "after_swap":
                store.command("TRUNCATE TABLE usage_events_rekeyed")
                store.command(
                    f"INSERT INTO usage_events_rekeyed ({migrations._LEDGER_COLUMNS}) "
                    f"SELECT {migrations._LEDGER_COLUMNS} FROM usage_events"
                )
                store.command("EXCHANGE TABLES usage_events AND usage_events_rekeyed")
        assert 12 in migrate(store)
        assert _key(store) == LEDGER_ORDER
        assert len(before) == 5000 and _ledger(store) == before
        tables = store.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
        assert ("usage_events_rekeyed",) not in tables
        assert migrate(store) == []
    finally:
        store.close()


WINDOWS = """INSERT INTO usage_windows
             SELECT 'm', concat('cus_', toString(number % 7)),
                    toDateTime(1700000000 + intDiv(number, 7) * 60, 'UTC'),
                    toDecimal128(number, 9), number % 5, 0, toDecimal128(number, 9), 0,
                    fromUnixTimestamp64Milli(toInt64(1700000000000), 'UTC'), 0,
                    fromUnixTimestamp64Milli(toInt64(1700000000000), 'UTC'),
                    fromUnixTimestamp64Milli(toInt64(1700000000000 + {shift:Int64}), 'UTC')
             FROM numbers(3000)"""


def _windows(store: Backend) -> list[tuple[object, ...]]:
    return store.query(
        """SELECT meter, customer_id, toUnixTimestamp(window_start), toString(sum_value),
                  event_count, toUnixTimestamp64Milli(computed_at)
           FROM usage_windows FINAL ORDER BY customer_id, window_start"""
    )


@pytest.mark.parametrize("cut", ["none", "after_copy", "after_swap"])
def test_windows_versioned_keep_what_they_read_even_when_cut_short(
    tmp_path: Path, cut: str
) -> None:
    from consumer.store.migrations import m14_windows_versioned as m14

    store = ChdbBackend(tmp_path / "chdb", "usage")
    try:
        _upto(store, 13)
        store.command(WINDOWS, {"shift": 5})
        store.command(WINDOWS.replace("toDecimal128(number, 9), number % 5", "1, 1"), {"shift": 9})
        before = _windows(store)  # the later insert of each window, as the old engine reads
        assert len(before) == 3000 and all(r[3] == "1" for r in before)
        if cut != "none":  # a crash part way: the copy made, maybe swapped, never recorded
            store.command(m14._VERSIONED)
            store.command(
                "INSERT INTO usage_windows_versioned SELECT * FROM usage_windows FINAL LIMIT 10"
            )
            if cut == "after_swap":
                store.command("TRUNCATE TABLE usage_windows_versioned")
                store.command(
                    "INSERT INTO usage_windows_versioned SELECT * FROM usage_windows FINAL"
                )
                store.command("EXCHANGE TABLES usage_windows AND usage_windows_versioned")
        assert 14 in migrate(store)
        assert _windows(store) == before
        tables = store.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
        assert ("usage_windows_versioned",) not in tables
        assert migrate(store) == []

        # A stale recompute (an older read) that lands last no longer replaces the newer one.
        store.command(WINDOWS.replace("toDecimal128(number, 9), number % 5", "7, 7"), {"shift": 1})
        assert _windows(store) == before
    finally:
        store.close()


class _Cut(Exception):
    pass


class _CutAfter(Passthrough):
    """Runs the first `n` statements that change something, then fails like a crash."""

    def __init__(self, inner: Backend, n: int) -> None:
        super().__init__(inner)
        self.left = n

    def check(self, text: str) -> None:
        if not text.lstrip().upper().startswith("SELECT"):
            self.left -= 1
            if self.left < 0:
                raise _Cut(text)


def _every_row(store: Backend, table: str, columns: str = "*") -> list[str]:
    rows = store.query(f"SELECT {columns} FROM {table}")  # every version, not FINAL
    return sorted(repr(r) for r in rows)


def _columns(store: Backend, table: str) -> str:
    """The table's columns now: a later migration may add some (dead_letters' headers,
    the ledger's topic id)."""
    rows = store.query(
        """SELECT name FROM system.columns WHERE database = currentDatabase()
           AND table = {t:String} AND default_kind != 'MATERIALIZED' ORDER BY position""",
        {"t": table},
    )
    return ", ".join(f"`{name}`" for (name,) in rows)


def test_partitioning_keeps_every_row_when_cut_short_at_any_statement(tmp_path: Path) -> None:
    """Migration 16 on a populated store, cut short after each of its statements in turn
    and then run again whole: every table holds exactly the rows it held, each version of
    each row (no row lost, none added), now partitioned by month."""
    from consumer.store.migrations.m16_partitioned_by_month import PARTITIONS

    path = tmp_path / "chdb"
    n = 0
    while True:
        store = ChdbBackend(path, f"cut{n}")  # one chDB path a process: a database a run
        _upto(store, 15)
        store.command(ROWS)
        store.command(ROWS.replace("1700000000000 + number", "1705000000000 + number"))
        store.command(WINDOWS, {"shift": 5})
        store.command(WINDOWS, {"shift": 9})
        store.command(
            """INSERT INTO dead_letters SELECT 't', number % 3, number, 'undecodable', '', '',
                   '', fromUnixTimestamp64Milli(toInt64(1700000000000 + number * 3e6), 'UTC'),
                   now64(3) FROM numbers(500)"""
        )
        store.command(
            """INSERT INTO late_events SELECT 't', 0, number, 'm', 'c', toString(number),
                   now64(3), 1, now64(3),
                   fromUnixTimestamp64Milli(toInt64(1700000000000 + number * 3e6), 'UTC')
               FROM numbers(500)"""
        )
        columns = {t: _columns(store, t) for t in PARTITIONS}  # a later migration adds some
        before = {t: _every_row(store, t, columns[t]) for t in PARTITIONS}
        try:
            migrate(_CutAfter(store, n))
            cut_short = False
        except _Cut:
            cut_short = True
        migrate(store)  # run again whole (the cut may have fallen in a later migration)
        assert migrate(store) == []
        for table, key in PARTITIONS.items():
            assert _every_row(store, table, columns[table]) == before[table], (n, table)
            assert table_property(store, table, "partition_key") == key
        months = store.query(
            "SELECT count(DISTINCT partition) FROM system.parts "
            "WHERE database = currentDatabase() AND table = 'usage_events' AND active"
        )
        assert int(months[0][0]) == 2
        # rows from before migration 25 name no incarnation, and never a real one
        ids = store.query("SELECT DISTINCT topic_id FROM usage_events")
        assert ids == [(UNRECORDED,)]
        leftovers = store.query(
            "SELECT name FROM system.tables "
            "WHERE database = currentDatabase() AND name LIKE '%_partitioned'"
        )
        assert leftovers == []
        store.close()
        if not cut_short:
            assert n > 4 * 3  # every table's copy steps were cut at least once
            break
        n += 1
