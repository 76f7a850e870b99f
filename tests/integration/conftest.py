from __future__ import annotations

import functools
import json
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import pytest
import stripe
from confluent_kafka import Consumer, TopicPartition

from consumer.app import Pipeline
from consumer.config import ClickHouseConfig, MeterConfig, Settings, load_settings
from consumer.local.broker import free_port
from consumer.local.demo import produce
from consumer.local.emulator import EmulatorOptions, EmulatorServer, serve
from consumer.local.sample import Sample, generate
from consumer.ops.totals import Totals
from consumer.store import Backend, open_store
from consumer.store.migrations import migrate
from tests.support.clickhouse_http import Endpoint, running

STRIPE_KEY = "sk_test_integration"
METERS = [
    {
        "name": "api_calls",
        "event_name": "api_call",
        "aggregation": "sum",
        "stripe_event_name": "api_calls",
        "emission": "aggregated",
    },
    {
        "name": "tokens",
        "event_name": "tokens",
        "aggregation": "sum",
        "stripe_event_name": "tokens",
        "emission": "per_event",
    },
    {
        "name": "storage_gb",
        "event_name": "storage_gb",
        "aggregation": "last",
        "stripe_event_name": "storage_gb",
        "emission": "per_event",
        "stripe_value_format": "decimal",
    },
]


def emulator_with_meters(seed: int) -> EmulatorServer:
    """A Stripe emulator on a free port holding the METERS (stop it when done)."""
    server = serve("127.0.0.1", 0, EmulatorOptions(seed=seed))
    client = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": server.url})
    for m in METERS:
        client.v1.billing.meters.create(
            {
                "display_name": str(m["name"]),
                "event_name": str(m["stripe_event_name"]),
                "default_aggregation": {"formula": "last" if m["aggregation"] == "last" else "sum"},
            }
        )
    return server


@pytest.fixture(scope="session")
def emulator() -> Iterator[EmulatorServer]:
    server = emulator_with_meters(seed=1)
    yield server
    server.stop()


class HasBootstrap(Protocol):
    bootstrap: str


def make_settings(
    broker: HasBootstrap, emulator: EmulatorServer, tmp: Path, name: str, **overrides: Any
) -> Settings:
    """Settings for one test: its own topic, group and chDB store; shared broker and Stripe."""
    base: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": broker.bootstrap,
            "topic": f"{name}.events",
            "dlq_topic": f"{name}.dlq",
            "late_topic": f"{name}.late",
            "group_id": name,
            "consumer_librdkafka": {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"},
        },
        # Tests kill processes, never hosts: the page cache survives a process, so fsync
        # changes nothing they can see but their time (test_durability.py runs it on).
        "clickhouse": {"chdb_path": str(tmp / "chdb"), "fsync_after_insert": False},
        "stripe": {
            "api_key": STRIPE_KEY,
            "api_base": emulator.url,
            "meter_events_base": emulator.url,
            "requests_per_second": 1000,
            "concurrency": 4,
            "poll_interval_seconds": 0.1,
        },
        "pipeline": {"batch_max_messages": 2000, "batch_max_seconds": 0.2},
        "meters": METERS,
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return load_settings(**base)


class HasTopics(HasBootstrap, Protocol):
    def create_topics(self, topics: dict[str, int]) -> None: ...


@dataclass
class Produced:
    """A test's own topic, store and customers, with a sample produced into the topic."""

    settings: Settings
    sample: Sample
    ends: dict[int, int]
    prefix: str


def produce_sample(
    broker: HasTopics,
    emulator: EmulatorServer,
    tmp: Path,
    name: str,
    events: int,
    customers: int,
    seed: int,
    partitions: int = 3,
    **overrides: Any,
) -> Produced:
    settings = make_settings(broker, emulator, tmp, name, **overrides)
    k = settings.kafka
    broker.create_topics({k.topic: partitions, k.dlq_topic: 1, k.late_topic: 1})
    prefix = f"cus_{name}_"
    sample = generate(
        events, customers, partitions, int(time.time() * 1000), seed=seed, customer_prefix=prefix
    )
    return Produced(settings, sample, produce(sample, broker.bootstrap, k.topic), prefix)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 90) -> None:
    """Poll `cond` until true; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def wait_outbox_drained(pipeline: Pipeline, what: str = "outbox drained") -> None:
    """Wait for an emitter cycle that started after now and found nothing to send."""
    emitter = pipeline.emitter
    assert emitter is not None
    mark = emitter.cycles
    wait_for(lambda: emitter.drained_since(mark), what)


# -- readers shared by the multi-instance tests (ledger, hours, Stripe hours, group offsets) --


def counter_total(counter: Any) -> float:
    """A Prometheus counter summed over all its labels."""
    return float(
        sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))
    )


def ledger_totals(store: Backend, meters: Sequence[MeterConfig], prefix: str) -> Totals:
    """Per-customer totals straight from the deduplicated ledger, not from the windows."""
    rows = store.query(
        """SELECT customer_id, meter, toString(sum(value)),
                  toString(argMax(value, (event_time, event_id)))
           FROM usage_events FINAL WHERE startsWith(customer_id, {p:String})
           GROUP BY customer_id, meter""",
        {"p": prefix},
    )
    agg = {m.name: m.aggregation for m in meters}
    return {
        (str(c), str(m)): Decimal(str(s if agg[str(m)] == "sum" else last))
        for c, m, s, last in rows
    }


HourKey = tuple[str, str, int]  # (customer, meter, hour start in epoch seconds)


def clickhouse_hourly(
    store: Backend, meters: Sequence[MeterConfig], prefix: str
) -> dict[HourKey, Decimal]:
    """The usage_hourly view (derived from the minute windows), as the sample's truth_hourly."""
    rows = store.query(
        """SELECT customer_id, meter, toUnixTimestamp(hour), toString(sum_value),
                  toString(last_value)
           FROM usage_hourly WHERE startsWith(customer_id, {p:String})""",
        {"p": prefix},
    )
    agg = {m.name: m.aggregation for m in meters}
    return {
        (str(c), str(m), int(h)): Decimal(str(s if agg[str(m)] == "sum" else last))
        for c, m, h, s, last in rows
    }


def stripe_hourly(url: str, meters: Sequence[MeterConfig], prefix: str) -> dict[HourKey, Decimal]:
    """What the emulator billed per customer, meter and event hour."""
    with urllib.request.urlopen(f"{url}/_emulator/hourly", timeout=10) as r:
        rows = json.loads(r.read())["rows"]
    meter_of = {m.stripe_event_name: m.name for m in meters if m.stripe_event_name}
    return {
        (x["customer"], meter_of[x["event_name"]], int(x["hour"])): Decimal(x["value"])
        for x in rows
        if x["event_name"] in meter_of and str(x["customer"]).startswith(prefix)
    }


def group_committed(
    bootstrap: str, group: str, topic: str, partitions: Iterable[int]
) -> dict[int, int]:
    """The group's committed offsets as the broker holds them (read without joining it)."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        got = probe.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    finally:
        probe.close()
    return {int(tp.partition or 0): int(tp.offset or 0) for tp in got}


# Real images for the testcontainers tests (they skip where no Docker engine runs).
CLICKHOUSE_IMAGE = "clickhouse/clickhouse-server:25.8"
KAFKA_IMAGE = "apache/kafka:3.9.1"
CLICKHOUSE_USER, CLICKHOUSE_PASSWORD = "usage", "s3cret"


@functools.cache
def docker_missing() -> str | None:
    """Why the testcontainers tests cannot run here, or None where a Docker engine runs."""
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
    except Exception as exc:
        return f"needs a Docker engine ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def server_config(host: str, port: int, database: str = "usage") -> dict[str, Any]:
    """The settings' `clickhouse` section for a ClickHouse server (real or the endpoint)."""
    return {
        "backend": "server",
        "host": host,
        "port": port,
        "username": CLICKHOUSE_USER,
        "password": CLICKHOUSE_PASSWORD,
        "database": database,
    }


@pytest.fixture
def migrated_store(tmp_path: Path) -> Iterator[Backend]:
    """A chDB store of the test's own, every migration applied; closed after the test."""
    s = open_store(ClickHouseConfig(chdb_path=tmp_path / "chdb"))
    migrate(s)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def clickhouse() -> Iterator[dict[str, Any]]:
    from testcontainers.clickhouse import ClickHouseContainer

    user, password = CLICKHOUSE_USER, CLICKHOUSE_PASSWORD
    with ClickHouseContainer(CLICKHOUSE_IMAGE, username=user, password=password) as ch:
        yield server_config(ch.get_container_host_ip(), int(ch.get_exposed_port(8123)))


@pytest.fixture(scope="session")
def clickhouse_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    """ClickHouse's HTTP interface over one chDB store, in a process of its own
    (tests/support/clickhouse_http.py): the server backend's stand-in server here."""
    path = tmp_path_factory.mktemp("clickhouse-http")
    with running(path, CLICKHOUSE_USER, CLICKHOUSE_PASSWORD) as endpoint:
        yield endpoint


@dataclass(frozen=True)
class ServerUnderTest:
    """A ClickHouse server for the server backend: the endpoint over chDB, or a real one."""

    name: str
    clickhouse: dict[str, Any]  # the settings' `clickhouse` section

    def kafka(self, request: pytest.FixtureRequest) -> HasTopics:
        """The broker beside it: real Kafka beside a real server, Tansu beside the endpoint."""
        if self.name == "endpoint":
            broker: HasTopics = request.getfixturevalue("broker")
            return broker
        return KafkaBroker(request.getfixturevalue("kafka"))


@pytest.fixture(
    scope="module", params=["endpoint", pytest.param("docker", marks=pytest.mark.docker)]
)
def clickhouse_server(request: pytest.FixtureRequest) -> ServerUnderTest:
    """Each server-backend test twice: against the chDB endpoint, and against the real
    image where a Docker engine runs (skipped, with the reason, where none does)."""
    if request.param == "endpoint":
        endpoint: Endpoint = request.getfixturevalue("clickhouse_http")
        return ServerUnderTest("endpoint", server_config(endpoint.host, endpoint.port))
    if (missing := docker_missing()) is not None:
        pytest.skip(missing)
    return ServerUnderTest("docker", request.getfixturevalue("clickhouse"))


class KafkaBroker:
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


@pytest.fixture(scope="module")
def kafka() -> Iterator[str]:
    """Single-node KRaft apache/kafka, advertised on a fixed host port."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    port = free_port()
    env = {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:29093",
        "KAFKA_LISTENERS": "CONTROLLER://:29093,PLAINTEXT_HOST://:9092,PLAINTEXT://:19092",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT_HOST://localhost:{port},"
        "PLAINTEXT://localhost:19092",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": (
            "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,PLAINTEXT_HOST:PLAINTEXT"
        ),
        "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
    }
    container = DockerContainer(KAFKA_IMAGE).with_bind_ports(9092, port)
    for k, v in env.items():
        container = container.with_env(k, v)
    with container:
        wait_for_logs(container, "Kafka Server started", timeout=120)
        yield f"localhost:{port}"


def explain_totals(store: Backend, got: Totals, want: Totals) -> str:
    """What a failed totals comparison needs to be diagnosed from the data: for every
    (customer, meter) that differs, the ledger's copies of one (meter, event id) (with the
    partition, offset and record time each came from), and the windows' sum beside the
    ledger's."""
    lines = []
    for customer, meter in sorted(k for k in {*got, *want} if got.get(k) != want.get(k)):
        lines.append(
            f"{customer} {meter}: got {got.get((customer, meter))} want "
            f"{want.get((customer, meter))}"
        )
        for row in store.query(
            """SELECT event_id, event_time, toString(value), partition, offset, record_time
               FROM usage_events FINAL
               WHERE meter = {m:String} AND customer_id = {c:String} AND event_id IN (
                   SELECT event_id FROM usage_events FINAL
                   WHERE meter = {m:String} AND customer_id = {c:String}
                   GROUP BY event_id HAVING count() > 1)
               ORDER BY event_id, partition, offset""",
            {"m": meter, "c": customer},
        ):
            lines.append(f"  ledger copy: {row}")
        for row in store.query(
            """SELECT 'ledger', toString(sum(value)), count() FROM usage_events FINAL
               WHERE meter = {m:String} AND customer_id = {c:String}
               UNION ALL
               SELECT 'windows', toString(sum(sum_value)), sum(event_count)
               FROM usage_windows FINAL WHERE meter = {m:String} AND customer_id = {c:String}""",
            {"m": meter, "c": customer},
        ):
            lines.append(f"  {row}")
    return "\n".join(lines)
