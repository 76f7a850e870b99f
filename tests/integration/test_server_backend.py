"""The production backend (`clickhouse.backend: server`, clickhouse-connect) end to end:
against the ClickHouse HTTP endpoint over chDB (tests/support/clickhouse_http.py) with
Tansu, and against a real ClickHouse server and real Kafka (apache/kafka) through
testcontainers where a Docker engine exists (skipped, with the reason, where none does)."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from consumer.local.demo import produce, run_until_drained, stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.local.sample import generate
from consumer.ops.totals import clickhouse_totals
from consumer.records import DECIMAL
from consumer.store import StoreError, open_store
from consumer.store.backend import Backend
from consumer.store.migrations import MIGRATIONS, migrate
from consumer.store.server import ServerBackend
from tests.integration.conftest import ServerUnderTest, make_settings

pytestmark = pytest.mark.integration


def server_backend(cfg: dict[str, Any]) -> Backend:
    return ServerBackend(
        cfg["host"], cfg["port"], cfg["username"], cfg["password"], cfg["database"]
    )


def test_server_backend_runs_the_same_migrations_and_queries(
    clickhouse_server: ServerUnderTest, unique: str
) -> None:
    store = server_backend({**clickhouse_server.clickhouse, "database": f"m{unique}"})
    try:
        assert migrate(store) == [version for version, _, _ in MIGRATIONS]
        assert migrate(store) == []
        names = {
            r[0]
            for r in store.query(
                "SELECT name FROM system.tables WHERE database = currentDatabase()"
            )
        }
        assert {
            "usage_events",
            "usage_windows",
            "stripe_pushes",
            "ingest_state",
            "dead_letters",
            "late_events",
            "usage_totals",
        } <= names
    finally:
        store.close()


def test_server_backend_reads_arrow_inputs_as_external_tables(
    clickhouse_server: ServerUnderTest, unique: str
) -> None:
    store = server_backend({**clickhouse_server.clickhouse, "database": f"x{unique}"})
    try:
        store.command("CREATE TABLE IF NOT EXISTS arrow_in (k String, v Decimal(38, 9)) "
                      "ENGINE = MergeTree ORDER BY k")  # fmt: skip
        keys = pa.table({"k": pa.array(["a", "b"]), "n": pa.array([1, 2], pa.uint32())})
        vals = pa.table({"k": pa.array(["a"]), "v": pa.array([Decimal("1.5")], DECIMAL)})
        store.command_with("INSERT INTO arrow_in SELECT k, v FROM $vals", {"vals": vals})
        rows = store.query_with(
            "SELECT k.k, k.n, toString(a.v) FROM $keys AS k LEFT JOIN arrow_in AS a ON a.k = k.k "
            "ORDER BY k.k",
            {"keys": keys},
        )
        assert rows == [("a", 1, "1.5"), ("b", 2, "0")]
    finally:
        store.close()


def test_wrong_password_never_appears_in_the_error(clickhouse_server: ServerUnderTest) -> None:
    cfg = {**clickhouse_server.clickhouse, "password": "wrong-pass-xyz"}
    with pytest.raises(StoreError) as e:
        server_backend(cfg)
    assert "wrong-pass-xyz" not in str(e.value)
    assert "516" in str(e.value)  # AUTHENTICATION_FAILED


def test_pipeline_on_kafka_and_a_clickhouse_server(
    clickhouse_server: ServerUnderTest,
    request: pytest.FixtureRequest,
    emulator: EmulatorServer,
    tmp_path: Path,
    unique: str,
) -> None:
    broker = clickhouse_server.kafka(request)
    ch = clickhouse_server.clickhouse
    settings = make_settings(broker, emulator, tmp_path, f"d{unique}", clickhouse=ch)
    k = settings.kafka
    broker.create_topics({k.topic: 3, k.dlq_topic: 1, k.late_topic: 1})
    prefix = f"cus_d{unique}_"
    sample = generate(10_000, 8, 3, int(time.time() * 1000), seed=13, customer_prefix=prefix)
    ends = produce(sample, broker.bootstrap, k.topic)
    run_until_drained(settings, ends, timeout=300, quiet=True)
    store = open_store(settings.clickhouse)
    try:
        totals = clickhouse_totals(store, settings.meters)
    finally:
        store.close()
    st = stripe_totals(settings, emulator.url)
    assert {key: v for key, v in totals.items() if key[0].startswith(prefix)} == sample.truth
    assert {key: v for key, v in st.items() if key[0].startswith(prefix)} == sample.truth
