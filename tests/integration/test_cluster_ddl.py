"""What `migrate` sends, recorded while it runs on chDB (tests/support/ddl.py): without a
cluster, exactly the single-server DDL recorded in single_server_ddl.json; with one, every
statement of every migration (callable steps too) rewritten for the cluster and nothing
else changed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from consumer.store.backend import StoreError
from consumer.store.chdb import ChdbBackend
from consumer.store.cluster import Cluster, sync_replicas
from consumer.store.migrations import MIGRATIONS, migrate
from tests.support.ddl import BOOTSTRAP, GOLDEN, Recorder, load_golden, record, single_server

pytestmark = pytest.mark.integration

CLUSTER = Cluster("usage_cluster")
DDL = re.compile(r"^\s*(CREATE|ALTER|DROP|RENAME|EXCHANGE|TRUNCATE)\b")


def test_without_a_cluster_migrate_sends_the_recorded_single_server_ddl(tmp_path: Path) -> None:
    now = record(tmp_path / "chdb")
    golden = load_golden()
    unrecorded = [k for k in now if k not in golden]
    assert not unrecorded, f"run `python -m tests.support.ddl` to record {unrecorded}"
    assert list(now) == [BOOTSTRAP] + [str(v) for v, _, _ in MIGRATIONS]
    for key, commands in now.items():
        assert commands == golden[key], f"migration {key} no longer sends what it did ({GOLDEN})"


def test_with_a_cluster_every_statement_runs_on_it_with_replicated_engines(
    tmp_path: Path,
) -> None:
    now = record(tmp_path / "chdb", CLUSTER)
    golden = load_golden()
    assert list(now) == list(golden)
    for key, commands in now.items():
        sent = [sql for sql, _ in commands]
        for sql in sent:
            if DDL.match(sql):
                assert " ON CLUSTER `usage_cluster`" in sql, sql
            for engine in re.findall(r"ENGINE\s*=\s*(\w+)", sql):
                assert engine.startswith("Replicated"), sql
            assert "non_replicated" not in sql
        # Besides what the cluster needs, the same statements with the same parameters.
        extra = [sql for sql in sent if single_server(sql) is None]
        kept = [(single_server(sql), p) for sql, p in commands if single_server(sql) is not None]
        if key == BOOTSTRAP:
            assert kept[0] == ("CREATE DATABASE IF NOT EXISTS `usage`", None)
            assert extra == ["SYSTEM SYNC REPLICA schema_migrations"]
            assert sent[-1] == extra[0]  # after creating it, before reading it
            kept, extra = kept[1:], []
        assert kept == golden[key]
        copies = [
            sql for sql in sent if re.match(r"INSERT INTO \w+_(rekeyed|versioned|partitioned)", sql)
        ]
        assert len(extra) == len(copies)  # one replica sync before each copy...
        for sync, copy in zip(extra, copies, strict=True):
            assert sent.index(sync) < sent.index(copy)  # ...ahead of it, of its source
            assert sync == f"SYSTEM SYNC REPLICA {copy.split(' FROM ')[1].split()[0]}"
    syncs = [sql for cmds in now.values() for sql, _ in cmds if sql.startswith("SYSTEM SYNC")]
    assert syncs == [
        "SYSTEM SYNC REPLICA schema_migrations",
        "SYSTEM SYNC REPLICA usage_events",  # m12
        "SYSTEM SYNC REPLICA usage_windows",  # m14
        "SYSTEM SYNC REPLICA usage_events",  # m16, each table it partitions
        "SYSTEM SYNC REPLICA usage_windows",
        "SYSTEM SYNC REPLICA dead_letters",
        "SYSTEM SYNC REPLICA late_events",
    ]


def test_a_start_in_cluster_mode_syncs_every_table_before_reading(tmp_path: Path) -> None:
    store = Recorder(ChdbBackend(tmp_path / "chdb", "usage"), single_server)
    try:
        migrate(store, CLUSTER)
        store.commands.clear()
        synced = sync_replicas(store, CLUSTER)
    finally:
        store.close()
    assert {"schema_migrations", "usage_events", "usage_windows", "stripe_pushes"} <= set(synced)
    assert "usage_hourly" not in synced  # a view holds no parts
    assert store.commands == [(f"SYSTEM SYNC REPLICA `{name}`", None) for name in synced]


def test_cluster_mode_refuses_a_database_made_for_one_server(tmp_path: Path) -> None:
    store = ChdbBackend(tmp_path / "chdb", "usage")
    try:
        migrate(store)
        with pytest.raises(StoreError, match="made for one server"):
            migrate(store, CLUSTER)
        assert migrate(store) == []
    finally:
        store.close()
