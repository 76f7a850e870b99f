"""The production backends: a real ClickHouse server (clickhouse-connect) and real Kafka
(apache/kafka), through testcontainers. They run where a Docker engine exists and are
skipped, with the reason, where it does not."""

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
from consumer.store import open_store
from consumer.store.backend import Backend
from consumer.store.migrations import MIGRATIONS, migrate
from consumer.store.server import ServerBackend
from tests.integration.conftest import make_settings


def _docker_missing() -> str | None:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
    except Exception as exc:
        return f"needs a Docker engine ({type(exc).__name__}: {str(exc)[:120]})"
    return None


MISSING = _docker_missing()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.docker,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


class _Broker:
    """The topic-creating part of TansuBroker, for a real Kafka."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    def create_topics(self, topics: dict[str, int]) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for fut in admin.create_topics(
            [NewTopic(n, num_partitions=p, replication_factor=1) for n, p in topics.items()]
        ).values():
            fut.result(30)


def _server(cfg: dict[str, Any]) -> Backend:
    return ServerBackend(
        cfg["host"], cfg["port"], cfg["username"], cfg["password"], cfg["database"]
    )


def test_server_backend_runs_the_same_migrations_and_queries(clickhouse: dict[str, Any]) -> None:
    store = _server(clickhouse)
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


def test_server_backend_reads_arrow_inputs_as_external_tables(clickhouse: dict[str, Any]) -> None:
    store = _server(clickhouse)
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


def test_wrong_password_never_appears_in_the_error(clickhouse: dict[str, Any]) -> None:
    from consumer.store import StoreError

    with pytest.raises(StoreError) as e:
        ServerBackend(clickhouse["host"], clickhouse["port"], "usage", "wrong-pass-xyz", "usage")
    assert "wrong-pass-xyz" not in str(e.value)


def test_pipeline_on_real_kafka_and_clickhouse_server(
    kafka: str,
    clickhouse: dict[str, Any],
    emulator: EmulatorServer,
    tmp_path: Path,
    unique: str,
) -> None:
    broker = _Broker(kafka)
    settings = make_settings(broker, emulator, tmp_path, f"d{unique}", clickhouse=clickhouse)
    k = settings.kafka
    broker.create_topics({k.topic: 3, k.dlq_topic: 1, k.late_topic: 1})
    prefix = f"cus_d{unique}_"
    sample = generate(10_000, 8, 3, int(time.time() * 1000), seed=13, customer_prefix=prefix)
    ends = produce(sample, kafka, k.topic)
    run_until_drained(settings, ends, timeout=300, quiet=True)
    store = open_store(settings.clickhouse)
    try:
        ch = {
            key: v
            for key, v in clickhouse_totals(store, settings.meters).items()
            if key[0].startswith(prefix)
        }
    finally:
        store.close()
    st = {
        key: v
        for key, v in stripe_totals(settings, emulator.url).items()
        if key[0].startswith(prefix)
    }
    assert ch == sample.truth
    assert st == sample.truth
