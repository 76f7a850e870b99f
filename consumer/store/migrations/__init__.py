"""The ClickHouse schema as numbered migrations, one module each (mNN_*.py), applied in
order and recorded in schema_migrations.

Every table is keyed by a deterministic identity (P3): writing the same rows twice
converges under FINAL. Analysts read the views at the end, never the raw tables.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

from consumer.store.backend import Backend, StoreError, quote_identifier
from consumer.store.cluster import Cluster, on_cluster
from consumer.store.migrations._sql import Step, table_property


def _load() -> list[tuple[int, str, list[Step]]]:
    """Every mNN_*.py module of this package, in order; each names its own NUMBER, which
    must be its file's. A twin is a bug, raised here; a gap is a number handed out to work
    not merged yet (or never needing a migration), so it is allowed: applied migrations are
    recorded by number, and one filling a gap later is applied when it arrives."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        match = re.fullmatch(r"m(\d+)_\w+", info.name)
        if match:
            module = importlib.import_module(f"{__name__}.{info.name}")
            found.append((int(match.group(1)), module))
    found.sort(key=lambda x: x[0])
    previous = 0
    for number, module in found:
        if number <= previous or number != module.NUMBER:
            raise RuntimeError(f"migration {module.__name__}: number {number} taken or wrong")
        previous = number
    return [(m.NUMBER, m.NAME, m.STEPS) for _, m in found]


MIGRATIONS: list[tuple[int, str, list[Step]]] = _load()


SCHEMA_MIGRATIONS = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
    "applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = ReplacingMergeTree "
    "ORDER BY version"
)


def migrate(store: Backend, cluster: Cluster | None = None) -> list[int]:
    """Apply pending migrations; returns the versions applied now. With a cluster, every
    statement (those of callable steps too) runs on each of its nodes and every table is
    replicated (store/cluster.py); schema_migrations as well, so any node knows the schema."""
    _check_mode(store, cluster)
    if cluster is not None:
        store = on_cluster(store, cluster)
        (database,) = store.query("SELECT currentDatabase()")[0]
        store.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(str(database))}")
    store.command(SCHEMA_MIGRATIONS)
    if cluster is not None:  # what another node recorded, before deciding what is pending
        store.command(cluster.sync_replica("schema_migrations"))
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


def _check_mode(store: Backend, cluster: Cluster | None) -> None:
    """Refuse to mix modes in one database: cluster DDL on single-server tables would leave
    them unreplicated, and single-server DDL on a cluster's tables would reach one node."""
    engine = table_property(store, "schema_migrations", "engine")
    if engine is None or engine.startswith("Replicated") == (cluster is not None):
        return
    if cluster is not None:
        raise StoreError(
            f"clickhouse.cluster is set but this database was made for one server "
            f"(schema_migrations is {engine}): cluster mode starts from a new database "
            "(docs/clickhouse.md)"
        )
    raise StoreError(
        f"this database is replicated (schema_migrations is {engine}): set clickhouse.cluster"
    )
