"""The command line as a user meets it: migrate, totals, config errors, a held store."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest

from consumer.emitter.plan import outbox
from consumer.emitter.plan.outbox import ATTEMPTED, REJECTED, SENT, Push
from consumer.store.chdb import ChdbBackend
from consumer.store.migrations import MIGRATIONS, migrate

pytestmark = pytest.mark.integration


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consumer.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_migrate_is_idempotent_and_totals_reads_the_store(tmp_path: Path) -> None:
    env = {"USAGE_CONSUMER_CLICKHOUSE__CHDB_PATH": str(tmp_path / "ch")}
    first = cli("migrate", env=env)
    assert first.returncode == 0, first.stderr
    applied = [version for version, _, _ in MIGRATIONS]
    assert applied == list(range(1, len(applied) + 1))  # numbered without gaps
    assert str(applied) in first.stdout
    again = cli("migrate", env=env)
    assert "up to date" in again.stdout
    totals = cli("totals", env=env)
    assert totals.returncode == 0 and "customer" in totals.stdout


def test_totals_lists_usage_stripe_did_not_bill(tmp_path: Path) -> None:
    env = {"USAGE_CONSUMER_CLICKHOUSE__CHDB_PATH": str(tmp_path / "ch")}
    store = ChdbBackend(tmp_path / "ch", "usage")
    try:
        migrate(store)
        base = Push("id-1", "per_event", "tokens", "tokens", "cus_1", 0, 0, Decimal("2.5"), 1)
        outbox.write(store, [base, base._replace(identifier="id-2").moved(SENT)], ATTEMPTED, 2)
        outbox.write(
            store,
            [base.moved(REJECTED, reason="customer_not_found: no such customer")],
            REJECTED,
            3,
        )
        outbox.write(store, [base._replace(identifier="id-2").moved(SENT)], SENT, 3)
    finally:
        store.close()
    out = cli("totals", env=env)
    assert out.returncode == 0, out.stderr
    assert "not billed by Stripe (1 pushes held for a person)" in out.stdout
    held = out.stdout.split("not billed by Stripe")[1]
    assert "cus_1" in held and "rejected" in held and "2.5" in held
    assert "customer_not_found" in held


def test_bad_config_names_the_field_and_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("meters:\n  - {name: m, event_name: m, aggregation: max, stripe_event_name: m}\n")
    out = cli("--config", str(f), "migrate")
    assert out.returncode == 2
    assert "meters.0" in out.stderr and "ClickHouse-only" in out.stderr
    out = cli("migrate", env={"USAGE_CONSUMER_PIPELINE__METRICS_PORT": "-5"})
    assert out.returncode == 2 and "pipeline.metrics_port" in out.stderr


def test_run_without_a_stripe_key_fails_clearly(tmp_path: Path) -> None:
    out = cli(
        "run",
        env={
            "USAGE_CONSUMER_CLICKHOUSE__CHDB_PATH": str(tmp_path / "ch"),
            "USAGE_CONSUMER_PIPELINE__METRICS_PORT": "0",
        },
    )
    assert out.returncode == 2
    assert "stripe.api_key" in out.stderr


def test_a_held_embedded_store_is_named_not_corrupted(tmp_path: Path) -> None:
    path = tmp_path / "ch"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path;"
                "from consumer.store.chdb import ChdbBackend;"
                f"b = ChdbBackend(Path({str(path)!r}), 'usage'); print('held', flush=True);"
                "time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        out = cli("totals", env={"USAGE_CONSUMER_CLICKHOUSE__CHDB_PATH": str(path)})
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 3
    assert f"in use by another process (PID {holder.pid})" in out.stderr
    # one clear line: not chDB's own "Code: 76 ... Cannot lock file" before it
    assert out.stderr.strip().count("\n") == 0, out.stderr
    time.sleep(0.1)
    after = cli("totals", env={"USAGE_CONSUMER_CLICKHOUSE__CHDB_PATH": str(path)})
    assert after.returncode == 3 and "run `usage-consumer migrate`" in after.stderr
    assert cli("migrate", env={"USAGE_CONSUMER_CLICKHOUSE__CHDB_PATH": str(path)}).returncode == 0
