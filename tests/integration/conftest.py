from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import stripe

from consumer.config import Settings, load_settings
from consumer.demo import produce
from consumer.emulator import EmulatorOptions, EmulatorServer, serve
from consumer.pipeline import Pipeline
from consumer.sample import Sample, generate

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
    },
]


@pytest.fixture(scope="session")
def emulator() -> Iterator[EmulatorServer]:
    server = serve("127.0.0.1", 0, EmulatorOptions(seed=1))
    client = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": server.url})
    for m in METERS:
        client.v1.billing.meters.create(
            {
                "display_name": str(m["name"]),
                "event_name": str(m["stripe_event_name"]),
                "default_aggregation": {"formula": "last" if m["aggregation"] == "last" else "sum"},
            }
        )
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
        "clickhouse": {"chdb_path": str(tmp / "chdb")},
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
