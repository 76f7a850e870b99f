"""Cluster mode's migrations on chDB, the engine every other test here runs on: applied in
a process of their own (tests/support/chdb_cluster.py) with a one-node cluster and
ClickHouse's in-process test Keeper configured. chDB 26.9 refuses distributed DDL, so this
is skipped with chDB's own reason until a chDB runs it; then every table must come out
replicated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_cluster_mode_migrations_on_chdb(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.chdb_cluster", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[0])
    if "Replicated DDL queries are disabled" in result.get("error", ""):
        pytest.skip(f"chDB runs no ON CLUSTER statement: {result['error']}")
    assert "error" not in result, result
    tables: dict[str, str] = result["tables"]
    assert {"schema_migrations", "usage_events", "usage_windows"} <= set(tables)
    stored = {name: engine for name, engine in tables.items() if engine != "View"}
    assert all(engine.startswith("Replicated") for engine in stored.values()), stored
