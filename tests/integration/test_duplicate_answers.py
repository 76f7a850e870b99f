"""The sender against the emulator over HTTP when Stripe rejects a whole request for a
repeated identifier: what each form of the answer costs in requests, and that every push is
billed exactly once. The oracle is the emulator's own state (GET /_emulator/state), which
shares no code with the sender."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import stripe

from consumer.clock import SystemClock
from consumer.emitter.plan.outbox import ATTEMPTED, Push
from consumer.emitter.send.ratelimit import TokenBucket
from consumer.emitter.send.sender import Sender, SendFailed, to_events
from consumer.emitter.send.session import SessionKeeper
from consumer.local.emulator import EmulatorOptions, EmulatorServer, serve
from consumer.metrics import Metrics

pytestmark = pytest.mark.integration

KEY = "sk_test_duplicates"
EVENT = "tokens"


@pytest.fixture
def emulator() -> Iterator[EmulatorServer]:
    server = serve("127.0.0.1", 0, EmulatorOptions(duplicate_answer="reject_request", seed=3))
    client = stripe.StripeClient(KEY, base_addresses={"api": server.url})
    client.v1.billing.meters.create(
        {"display_name": EVENT, "event_name": EVENT, "default_aggregation": {"formula": "sum"}}
    )
    try:
        yield server
    finally:
        server.stop()


def state(server: EmulatorServer) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.url}/_emulator/state", timeout=10) as resp:
        snapshot: dict[str, Any] = json.loads(resp.read())
        return snapshot


def configure(server: EmulatorServer, **changes: object) -> None:
    request = urllib.request.Request(
        f"{server.url}/_emulator/config",
        data=json.dumps(changes).encode(),
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=10).close()


def sender(server: EmulatorServer, max_retries: int = 3, metrics: Metrics | None = None) -> Sender:
    bases = {"api": server.url, "meter_events": server.url}
    clock = SystemClock()
    api = stripe.StripeClient(KEY, base_addresses=bases)  # type: ignore[arg-type]
    metrics = metrics or Metrics()
    keeper = SessionKeeper(api, clock, 60.0, metrics)
    limiter = TokenBucket(1000.0, clock)
    return Sender(keeper, bases, clock, limiter, metrics, max_retries)


def push(i: int, value: str = "", attempted_ms: int = 0) -> Push:
    """Push `i`: customer cus_<i> with value i + 1 (or `value`), so each customer's total
    shows how often its push was billed."""
    now_ms = int(time.time() * 1000)
    return Push(
        identifier=f"uc1e_{i:040x}",
        mode="per_event",
        meter=EVENT,
        stripe_event_name=EVENT,
        customer_id=f"cus_{i}",
        bucket_ms=now_ms - 60_000,
        revision=0,
        value=Decimal(value or i + 1),
        first_attempt_ms=attempted_ms or now_ms,
        status=ATTEMPTED,
    )


def deliver_directly(server: EmulatorServer, pushes: list[Push]) -> None:
    """Stripe already holds `pushes`: sent straight through the SDK, as a process that
    crashed before marking them did."""
    bases: Any = {"api": server.url, "meter_events": server.url}
    token = stripe.StripeClient(KEY, base_addresses=bases).v2.billing.meter_event_session.create()
    stream = stripe.StripeClient(token.authentication_token, base_addresses=bases)
    events: Any = [e for p in pushes for e in to_events(p)]
    stream.v2.billing.meter_event_stream.create({"events": events})


def billed(server: EmulatorServer) -> dict[str, Decimal]:
    return {r["customer"]: Decimal(r["value"]) for r in state(server)["totals"]}


def expected(pushes: list[Push]) -> dict[str, Decimal]:
    return {p.customer_id: p.value for p in pushes}


def counter(metrics: Metrics, name: str) -> float:
    return metrics.registry.get_sample_value(f"usage_consumer_{name}_total") or 0.0


def test_named_duplicates_cost_one_more_request_and_every_push_is_billed_once(
    emulator: EmulatorServer,
) -> None:
    configure(emulator, duplicate_names="all")
    big = push(99, value="2999999999999997")  # three events: <id>, <id>-p1, <id>-p2
    pushes = [push(i) for i in range(10)] + [big]
    held = [pushes[2], pushes[7], big]
    deliver_directly(emulator, held)
    before = state(emulator)["requests"]["stream"]
    metrics = Metrics()
    assert sender(emulator, metrics=metrics).send(pushes) == pushes
    after = state(emulator)
    assert after["requests"]["stream"] - before == 2
    assert after["duplicate_requests"] == 1
    assert billed(emulator) == expected(pushes)
    assert after["events_accepted"] == len(to_events(big)) + len(pushes) - 1
    assert counter(metrics, "stripe_duplicate_events") == 2 + len(to_events(big))


def test_the_first_name_only_costs_a_request_per_duplicate(emulator: EmulatorServer) -> None:
    configure(emulator, duplicate_names="first")
    pushes = [push(i) for i in range(10)]
    deliver_directly(emulator, [pushes[3], pushes[8]])
    before = state(emulator)["requests"]["stream"]
    assert sender(emulator).send(pushes) == pushes
    assert state(emulator)["requests"]["stream"] - before == 3
    assert billed(emulator) == expected(pushes)


def test_an_answer_naming_nothing_isolates_only_that_requests_uncertain_pushes(
    emulator: EmulatorServer,
) -> None:
    configure(emulator, duplicate_names="none")
    crashed_ms = int(time.time() * 1000) - 3_600_000  # sent by a process that crashed
    uncertain = [push(i, attempted_ms=crashed_ms) for i in (0, 1, 2)]
    deliver_directly(emulator, uncertain[:2])
    metrics = Metrics()
    s = sender(emulator, metrics=metrics)
    mixed = [uncertain[0], *[push(i) for i in range(3, 8)], uncertain[1], uncertain[2]]
    clean = [push(i) for i in range(8, 14)]
    before = state(emulator)["requests"]["stream"]
    assert s.send(mixed) == mixed
    # rejected, then the five never-sent pushes together, then each uncertain one alone
    assert state(emulator)["requests"]["stream"] - before == 2 + len(uncertain)
    before = state(emulator)["requests"]["stream"]
    assert s.send(clean) == clean
    assert state(emulator)["requests"]["stream"] - before == 1
    assert billed(emulator) == expected(mixed + clean)
    assert counter(metrics, "stripe_duplicate_events") == 2


@pytest.mark.parametrize("idempotency", [True, False])
def test_a_retry_after_a_reset_that_stored_the_events_is_not_a_duplicate_with_keys(
    emulator: EmulatorServer, idempotency: bool
) -> None:
    configure(emulator, duplicate_names="all", idempotency=idempotency, reset_rate=1.0)
    pushes = [push(i) for i in range(5)]
    s = sender(emulator, max_retries=0)
    with pytest.raises(SendFailed):
        s.send(pushes)  # stored, and the connection reset before the answer
    assert billed(emulator) == expected(pushes)
    configure(emulator, reset_rate=0.0)
    assert s.send(pushes) == pushes  # the next cycle sends the same request again
    after = state(emulator)
    assert billed(emulator) == expected(pushes)
    assert after["requests"]["stream"] == 2
    if idempotency:
        assert (after["idempotent_replays"], after["duplicate_requests"]) == (1, 0)
    else:
        assert (after["idempotent_replays"], after["duplicate_requests"]) == (0, 1)
