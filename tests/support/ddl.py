"""What `migrate` sends, recorded over a real chDB store.

`Recorder` is a Backend that keeps every command it is given and runs it on the store
underneath, so the migrations (callable steps too) run for real while their statements are
captured. `single_server_ddl.json` holds the statements a fresh single-server store gets,
per migration: cluster mode must leave them byte for byte as they are when no cluster is
configured, and a migration once released must not change. A new migration is recorded
once, deliberately: `python -m tests.support.ddl` (adds what the file lacks, never
rewrites what it holds).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from consumer.store.backend import Backend, Row
from consumer.store.chdb import ChdbBackend
from consumer.store.cluster import Cluster
from consumer.store.migrations import migrate

GOLDEN = Path(__file__).with_name("single_server_ddl.json")
BOOTSTRAP = "schema_migrations"  # what migrate runs before any migration
Command = tuple[str, dict[str, Any] | None]


class Recorder:
    """A Backend recording each command, then running `translate(sql)` on `store` (or
    nothing when that is None)."""

    def __init__(self, store: Backend, translate: Callable[[str], str | None] = str) -> None:
        self.store = store
        self.translate = translate
        self.commands: list[Command] = []

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self.commands.append((sql, dict(params) if params else None))
        runnable = self.translate(sql)
        if runnable is not None:
            self.store.command(runnable, params)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        return self.store.query(sql, params)

    def insert_columns(self, table: str, columns: Mapping[str, pa.Array], token: str = "") -> None:
        self.store.insert_columns(table, columns, token)

    def query_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> list[Row]:
        return self.store.query_with(sql, inputs, params)

    def command_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> None:
        self.commands.append((sql, dict(params) if params else None))
        self.store.command_with(sql, inputs, params)

    def close(self) -> None:
        self.store.close()


def by_migration(commands: list[Command]) -> dict[str, list[Command]]:
    """Commands grouped by the migration they belong to: each migration ends with its row
    in schema_migrations; what comes before the first is the bootstrap."""
    groups: dict[str, list[Command]] = {}
    current: list[Command] = []
    for sql, params in commands:
        if sql == f"SYSTEM SYNC REPLICA {BOOTSTRAP}" and not current:
            groups[BOOTSTRAP].append((sql, params))  # cluster mode: part of the bootstrap
            continue
        current.append((sql, params))
        if sql.startswith("INSERT INTO schema_migrations") and params is not None:
            groups[str(params["v"])] = current
            current = []
        elif BOOTSTRAP not in groups and sql.startswith("CREATE TABLE IF NOT EXISTS " + BOOTSTRAP):
            groups[BOOTSTRAP] = current
            current = []
    if current:
        groups["unfinished"] = current
    return groups


def record(path: Path, cluster: Cluster | None = None) -> dict[str, list[Command]]:
    """Every command migrate sends to a fresh store at `path`, per migration. In cluster mode
    the statements run on chDB as single-server DDL (`single_server`): chDB runs no
    distributed DDL, but the copies and their checks still run on a real engine."""
    store = Recorder(ChdbBackend(path, "usage"), single_server if cluster else str)
    try:
        migrate(store, cluster)
    finally:
        store.close()
    return by_migration(store.commands)


def load_golden() -> dict[str, list[Command]]:
    raw: dict[str, list[list[Any]]] = json.loads(GOLDEN.read_text())
    return {k: [(str(sql), params) for sql, params in v] for k, v in raw.items()}


_ON_CLUSTER = re.compile(r" ON CLUSTER `(?:[^`\\]|\\.)*`")
_REPLICATED = re.compile(r"\bReplicated(\w*MergeTree)\('(?:[^'\\]|\\.)*', '(?:[^'\\]|\\.)*'(, )?")


def single_server(sql: str) -> str | None:
    """A cluster-mode statement as the single server runs it (None: nothing to run), for
    running cluster-mode migrations on chDB. Undoes exactly what the renderer adds."""
    if sql.startswith("SYSTEM SYNC REPLICA"):
        return None
    sql = _ON_CLUSTER.sub("", sql)
    sql = _REPLICATED.sub(r"\1(", sql).replace("MergeTree()", "MergeTree")
    return re.sub(
        r"\breplicated_deduplication_window\b", "non_replicated_deduplication_window", sql
    )


def main() -> int:
    golden = load_golden() if GOLDEN.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        now = record(Path(tmp) / "chdb")
    added = [k for k in now if k not in golden]
    golden.update({k: now[k] for k in added})
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"recorded: {added or 'nothing new'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
