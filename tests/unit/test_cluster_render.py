"""Cluster mode's rewriting of statements (consumer/store/cluster.py) and its settings."""

from __future__ import annotations

import pytest

from consumer.config import ClickHouseConfig, ConfigError, load_settings
from consumer.store.cluster import Cluster, cluster_of, unreplicated

C = Cluster("usage_cluster")
ON = "ON CLUSTER `usage_cluster`"
KEEPER = "'/clickhouse/tables/{uuid}/{shard}', '{replica}'"


@pytest.mark.parametrize(
    ("sql", "rendered"),
    [
        (
            "CREATE TABLE t (a Int8) ENGINE = Memory",
            f"CREATE TABLE t {ON} (a Int8) ENGINE = Memory",
        ),
        (
            "CREATE TABLE IF NOT EXISTS db.t (a Int8) ENGINE = Memory",
            f"CREATE TABLE IF NOT EXISTS db.t {ON} (a Int8) ENGINE = Memory",
        ),
        (
            "create table if not exists `odd name`.`t``x` UUID '1-2' (a Int8) ENGINE = Log",
            f"create table if not exists `odd name`.`t``x` UUID '1-2' {ON} (a Int8) ENGINE = Log",
        ),
        (
            "CREATE VIEW IF NOT EXISTS v AS SELECT 1",
            f"CREATE VIEW IF NOT EXISTS v {ON} AS SELECT 1",
        ),
        ("CREATE OR REPLACE VIEW v AS SELECT 1", f"CREATE OR REPLACE VIEW v {ON} AS SELECT 1"),
        (
            "CREATE MATERIALIZED VIEW IF NOT EXISTS mv TO t AS SELECT 1 AS a",
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS mv {ON} TO t AS SELECT 1 AS a",
        ),
        ("CREATE DATABASE IF NOT EXISTS `usage`", f"CREATE DATABASE IF NOT EXISTS `usage` {ON}"),
        (
            "ALTER TABLE t ADD COLUMN IF NOT EXISTS b String DEFAULT ''",
            f"ALTER TABLE t {ON} ADD COLUMN IF NOT EXISTS b String DEFAULT ''",
        ),
        (
            "ALTER TABLE `t` MODIFY SETTING fsync_after_insert = 1",
            f"ALTER TABLE `t` {ON} MODIFY SETTING fsync_after_insert = 1",
        ),
        ("DROP TABLE IF EXISTS t", f"DROP TABLE IF EXISTS t {ON}"),
        ("DROP TABLE t SYNC", f"DROP TABLE t {ON} SYNC"),
        ("DROP VIEW IF EXISTS v", f"DROP VIEW IF EXISTS v {ON}"),
        ("RENAME TABLE a TO b, c TO d", f"RENAME TABLE a TO b, c TO d {ON}"),
        ("EXCHANGE TABLES a AND b;", f"EXCHANGE TABLES a AND b {ON};"),
        ("TRUNCATE TABLE t", f"TRUNCATE TABLE t {ON}"),
        ("TRUNCATE TABLE IF EXISTS t", f"TRUNCATE TABLE IF EXISTS t {ON}"),
        ("OPTIMIZE TABLE t FINAL", f"OPTIMIZE TABLE t {ON} FINAL"),
        ("-- why\n  DROP TABLE t", f"-- why\n  DROP TABLE t {ON}"),
    ],
)
def test_each_kind_of_ddl_runs_on_the_cluster(sql: str, rendered: str) -> None:
    assert C.render(sql) == rendered
    assert C.render(rendered) == rendered  # rendering twice changes nothing


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO schema_migrations (version, name) VALUES ({v:UInt32}, {n:String})",
        "INSERT INTO t (a) SELECT a FROM s",
        "SELECT * FROM usage_windows FINAL",
        "SYSTEM SYNC REPLICA t",
    ],
)
def test_statements_that_are_not_ddl_are_left_alone(sql: str) -> None:
    assert C.render(sql) == sql


@pytest.mark.parametrize(
    ("engine", "replicated"),
    [
        ("MergeTree", f"ReplicatedMergeTree({KEEPER})"),
        ("MergeTree()", f"ReplicatedMergeTree({KEEPER})"),
        ("ReplacingMergeTree", f"ReplicatedReplacingMergeTree({KEEPER})"),
        ("ReplacingMergeTree(computed_at)", f"ReplicatedReplacingMergeTree({KEEPER}, computed_at)"),
        (
            "ReplacingMergeTree(ver, is_deleted)",
            f"ReplicatedReplacingMergeTree({KEEPER}, ver, is_deleted)",
        ),
        ("SummingMergeTree((a, b))", f"ReplicatedSummingMergeTree({KEEPER}, (a, b))"),
        ("AggregatingMergeTree", f"ReplicatedAggregatingMergeTree({KEEPER})"),
        ("CollapsingMergeTree(sign)", f"ReplicatedCollapsingMergeTree({KEEPER}, sign)"),
        (
            "VersionedCollapsingMergeTree(s, v)",
            f"ReplicatedVersionedCollapsingMergeTree({KEEPER}, s, v)",
        ),
    ],
)
def test_engines_become_replicated_with_their_own_arguments_kept(
    engine: str, replicated: str
) -> None:
    sql = f"CREATE TABLE t (a Int8) ENGINE = {engine}\nORDER BY a"
    assert C.render(sql) == f"CREATE TABLE t {ON} (a Int8) ENGINE = {replicated}\nORDER BY a"


def test_an_engine_already_replicated_is_kept() -> None:
    sql = (
        f"CREATE TABLE t {ON} (a Int8) ENGINE = ReplicatedMergeTree('/x/{{uuid}}', 'r') ORDER BY a"
    )
    assert C.render(sql) == sql


def test_a_mergetree_engine_without_a_replicated_twin_is_refused() -> None:
    with pytest.raises(ValueError, match="no replicated NotARealMergeTree"):
        C.render("CREATE TABLE t (a Int8) ENGINE = NotARealMergeTree ORDER BY a")


def test_the_insert_dedup_window_becomes_the_replicated_one() -> None:
    sql = "CREATE TABLE t (a Int8) ENGINE = MergeTree ORDER BY a SETTINGS {}"
    sql = sql.format("non_replicated_deduplication_window = 1000")
    out = C.render(sql)
    assert out.endswith("SETTINGS replicated_deduplication_window = 1000")
    assert "non_replicated" not in out


def test_names_paths_and_macros_are_quoted() -> None:
    odd = Cluster("{cluster}", "/ch/it's/{uuid}", "{replica}")
    out = odd.render("CREATE TABLE t (a Int8) ENGINE = MergeTree ORDER BY a")
    assert out == (
        "CREATE TABLE t ON CLUSTER `{cluster}` (a Int8) "
        "ENGINE = ReplicatedMergeTree('/ch/it\\'s/{uuid}', '{replica}') ORDER BY a"
    )
    assert Cluster("a`b").render("DROP TABLE t") == "DROP TABLE t ON CLUSTER `a\\`b`"


def test_an_existing_on_cluster_is_not_mistaken_for_part_of_a_name() -> None:
    sql = "CREATE TABLE IF NOT EXISTS usage_events ON CLUSTER other (a Int8) ENGINE = Memory"
    assert C.render(sql) == sql


def test_engine_checks_read_replicated_tables_as_one_server_shows_them() -> None:
    replicated = f"ReplicatedReplacingMergeTree({KEEPER}, computed_at) ORDER BY (a, b)"
    assert unreplicated(replicated) == "ReplacingMergeTree(computed_at) ORDER BY (a, b)"
    assert unreplicated(f"ReplicatedMergeTree({KEEPER}) ORDER BY a") == "MergeTree ORDER BY a"
    assert unreplicated("MergeTree() ORDER BY a") == "MergeTree() ORDER BY a"


def test_no_cluster_is_the_default() -> None:
    assert cluster_of(ClickHouseConfig()) is None


def test_the_cluster_settings_reach_the_renderer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USAGE_CONSUMER_CLICKHOUSE__CLUSTER", "billing")
    monkeypatch.setenv("USAGE_CONSUMER_CLICKHOUSE__BACKEND", "server")
    cfg = load_settings().clickhouse
    assert cluster_of(cfg) == Cluster("billing", "/clickhouse/tables/{uuid}/{shard}", "{replica}")


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"cluster": "two words"}, "cluster must be a cluster name"),
        ({"cluster": "a`b"}, "cluster must be a cluster name"),
        ({"cluster": ""}, "cluster must be a cluster name"),
        ({"cluster": "c", "backend": "chdb"}, "cluster mode needs backend: server"),
        (
            {"cluster": "c", "replica_path": "/clickhouse/{database}/{table}"},
            "must be an absolute Keeper path holding {uuid}",
        ),
        ({"cluster": "c", "replica_path": "tables/{uuid}"}, "must be an absolute Keeper path"),
        ({"cluster": "c", "replica_name": "node1"}, "replica_name must hold a macro"),
    ],
)
def test_a_bad_cluster_setting_fails_clearly(section: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match="clickhouse") as err:
        load_settings(clickhouse={"backend": "server", **section})
    assert problem in str(err.value)


def test_cluster_settings_are_ignored_without_a_cluster() -> None:
    cfg = load_settings(clickhouse={"replica_name": "literal"}).clickhouse
    assert cluster_of(cfg) is None
