from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import stripe

from consumer.config import Settings, load_settings
from consumer.emulator import EmulatorOptions, EmulatorServer, serve

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
