"""Cluster mode's migrations on chDB, in a process of their own: chDB opened with a
configuration naming a one-node cluster, ClickHouse's in-process test Keeper and the
macros, then `migrate` in cluster mode. Prints one JSON line: the tables and engines made,
or the error that stopped it. A process of its own because chDB holds one store per
process and has aborted at exit with a replicated table open.

    python -m tests.support.chdb_cluster DIR
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import chdb

from consumer.store.backend import Row
from consumer.store.cluster import Cluster
from consumer.store.migrations import migrate

CLUSTER = Cluster("usage_cluster")
CONFIG = """<clickhouse>
  <zookeeper><implementation>testkeeper</implementation></zookeeper>
  <macros><shard>01</shard><replica>r1</replica></macros>
  <remote_servers><usage_cluster><shard><replica>
    <host>127.0.0.1</host><port>9000</port>
  </replica></shard></usage_cluster></remote_servers>
</clickhouse>
"""


class _Conn:
    """The two Backend calls migrate makes, over one chDB connection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self.conn.query(sql, "CSV", params=dict(params or {}))

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        raw = self.conn.query(sql, "JSONCompact", params=dict(params or {})).bytes()
        return [tuple(r) for r in json.loads(raw)["data"]] if raw else []


def main(path: Path) -> dict[str, Any]:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.xml").write_text(CONFIG)
    conn = chdb.connect(f"file:{path / 'store'}?config-file={path / 'config.xml'}")
    conn.query("CREATE DATABASE IF NOT EXISTS usage", "CSV")
    conn.query("USE usage", "CSV")
    store = _Conn(conn)
    try:
        migrate(store, CLUSTER)  # type: ignore[arg-type]  # migrate uses command and query
    except Exception as exc:
        return {"error": str(exc).strip().splitlines()[0]}
    rows = store.query("SELECT name, engine FROM system.tables WHERE database = 'usage'")
    return {"tables": {str(n): str(e) for n, e in rows}}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))), flush=True)
