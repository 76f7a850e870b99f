"""Stripe Connect end to end: each tenant's usage is billed in its own connected account
(Tansu, chDB and the emulator, which keeps connected accounts apart as Stripe does)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import stripe

from consumer.config import Settings
from consumer.local.broker import TansuBroker
from consumer.local.demo import run_until_drained
from consumer.local.emulator import EmulatorOptions, EmulatorServer, serve
from consumer.producer import UsageProducer
from consumer.store import open_store
from tests.integration.conftest import METERS, STRIPE_KEY, make_settings

pytestmark = pytest.mark.integration
ACCOUNTS = {"acme": "acct_1Acme", "globex": "acct_2Globex"}
TENANT = {"cus_a1": "acme", "cus_a2": "acme", "cus_g1": "globex", "cus_y": "initech", "cus_x": ""}


@pytest.fixture
def connected() -> Iterator[EmulatorServer]:
    """An emulator whose connected accounts hold the meters; the platform holds none."""
    emu = serve("127.0.0.1", 0, EmulatorOptions(seed=3))
    client = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": emu.url})
    for account in ACCOUNTS.values():
        for m in METERS:
            formula = "last" if m["aggregation"] == "last" else "sum"
            params: Any = {
                "display_name": str(m["name"]),
                "event_name": str(m["stripe_event_name"]),
                "default_aggregation": {"formula": formula},
            }
            client.v1.billing.meters.create(params, {"stripe_account": account})
    yield emu
    emu.stop()


def state(emu: EmulatorServer) -> dict[str, Any]:
    with urllib.request.urlopen(f"{emu.url}/_emulator/state", timeout=5) as resp:
        snapshot: dict[str, Any] = json.loads(resp.read())
    return snapshot


def totals(snapshot: dict[str, Any]) -> dict[tuple[str, str], Decimal]:
    return {(t["event_name"], t["customer"]): Decimal(t["value"]) for t in snapshot["totals"]}


def tenants(
    broker: TansuBroker, connected: EmulatorServer, tmp_path: Path, unique: str
) -> tuple[Settings, UsageProducer]:
    """Settings billing each tenant in its connected account, its topics, a producer."""
    settings = make_settings(
        broker,
        connected,
        tmp_path,
        unique,
        stripe={"account_property": "tenant", "accounts": ACCOUNTS},
    )
    k = settings.kafka
    broker.create_topics({k.topic: 1, k.dlq_topic: 1, k.late_topic: 1})
    producer = UsageProducer({"bootstrap.servers": broker.bootstrap}, k.topic)
    return settings, producer


def test_each_tenant_is_billed_in_its_connected_account(
    broker: TansuBroker, connected: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings, producer = tenants(broker, connected, tmp_path, unique)
    now = int(time.time() * 1000) - 3_600_000
    truth: dict[str, dict[tuple[str, str], Decimal]] = {}
    n = 0
    for customer, tenant in TENANT.items():
        for i in range(30):
            for event_name, stripe_name in (("api_call", "api_calls"), ("tokens", "tokens")):
                value = Decimal(i % 7 + 1)
                producer.send(
                    event_id=f"{customer}-{event_name}-{i}",
                    event_name=event_name,
                    customer_id=customer,
                    value=value,
                    timestamp_ms=now + i * 20_000,
                    properties={"tenant": tenant} if tenant else {},
                )
                n += 1
                billed = truth.setdefault(ACCOUNTS.get(tenant, ""), {})
                billed[(stripe_name, customer)] = billed.get((stripe_name, customer), 0) + value
    assert producer.flush() == 0
    run_until_drained(settings, {0: n}, timeout=120, quiet=True)

    snapshot = state(connected)
    for account in ACCOUNTS.values():
        assert totals(snapshot["accounts"][account]) == truth[account]
    assert totals(snapshot) == {}  # nothing went to the platform account
    # Stripe's own summaries, read per account, agree
    client = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": connected.url})
    acme: Any = {"stripe_account": ACCOUNTS["acme"]}
    meters: Any = client.v1.billing.meters.list({"limit": 100}, acme)
    tokens = next(m for m in meters.data if m.event_name == "tokens")
    start = now // 60_000 * 60
    params: Any = {"customer": "cus_a1", "start_time": start, "end_time": start + 3600}
    summary = client.v1.billing.meters.event_summaries.list(tokens.id, params, acme)
    counted = Decimal(repr(summary.data[0].aggregated_value))
    assert counted == truth["acct_1Acme"][("tokens", "cus_a1")]

    # no tenant, or an unmapped one: held with the reason, never sent anywhere
    store = open_store(settings.clickhouse)
    try:
        rows = store.query(
            "SELECT customer_id, status, reason, stripe_account FROM stripe_pushes FINAL "
            "INNER JOIN stripe_delivery USING identifier WHERE customer_id IN ('cus_x', 'cus_y')"
        )
    finally:
        store.close()
    held = {(str(c), str(s)) for c, s, _, _ in rows}
    assert held == {("cus_x", "rejected"), ("cus_y", "rejected")}
    reasons = {str(c): str(r) for c, _, r, _ in rows}
    assert "name no tenant" in reasons["cus_x"]
    assert "'initech' has no connected account" in reasons["cus_y"]


def test_cancelled_usage_is_taken_back_in_the_account_that_billed_it(
    broker: TansuBroker, connected: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings, producer = tenants(broker, connected, tmp_path, unique)
    t = int(time.time() * 1000) - 3_600_000
    usage = [  # (customer, event name, event id, value)
        ("cus_a1", "tokens", "t0", 5),
        ("cus_a1", "tokens", "t1", 3),
        ("cus_g1", "api_call", "a0", 4),
        ("cus_g1", "api_call", "a1", 6),
    ]
    for i, (customer, name, event_id, value) in enumerate(usage):
        producer.send(
            event_id=event_id,
            event_name=name,
            customer_id=customer,
            value=Decimal(value),
            timestamp_ms=t + i,
            properties={"tenant": TENANT[customer]},
        )
    assert producer.flush() == 0
    run_until_drained(settings, {0: len(usage)}, timeout=120, quiet=True)
    billed = state(connected)["accounts"]
    assert totals(billed[ACCOUNTS["acme"]]) == {("tokens", "cus_a1"): 8}
    assert totals(billed[ACCOUNTS["globex"]]) == {("api_calls", "cus_g1"): 10}

    # Cancels carry no tenant: each is taken back where its push was billed.
    producer.cancel(event_id="x-t0", event_name="tokens", customer_id="cus_a1",
                    cancels="t0", timestamp_ms=t + 10)  # fmt: skip
    producer.cancel(event_id="x-a0", event_name="api_call", customer_id="cus_g1",
                    cancels="a0", timestamp_ms=t + 11)  # fmt: skip
    assert producer.flush() == 0
    run_until_drained(settings, {0: len(usage) + 2}, timeout=120, quiet=True)
    snapshot = state(connected)
    assert totals(snapshot["accounts"][ACCOUNTS["acme"]]) == {("tokens", "cus_a1"): 3}
    assert totals(snapshot["accounts"][ACCOUNTS["globex"]]) == {("api_calls", "cus_g1"): 6}
    assert totals(snapshot) == {}  # nothing reached the platform account
    store = open_store(settings.clickhouse)
    try:
        rows = store.query(
            "SELECT meter, customer_id, outcome, toString(value) FROM stripe_corrections FINAL "
            "ORDER BY meter"
        )
    finally:
        store.close()
    assert rows == [("api_calls", "cus_g1", "adjusted", "4"), ("tokens", "cus_a1", "adjusted", "5")]
