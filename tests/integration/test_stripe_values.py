"""Whole-number values against the emulator: fractions carry, nothing is rounded away or
billed twice across a lost mark, and values over 15 digits arrive split but exact."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path

import pytest

from consumer.emitter.plan import outbox
from consumer.emitter.plan.identifiers import per_event_identifier
from consumer.emitter.plan.outbox import PENDING, Push
from consumer.emitter.truth.delivery import HOUR_MS, MINUTE_MS
from consumer.local.emulator import EmulatorServer
from tests.integration.conftest import METERS
from tests.integration.test_stripe_delivery import (
    Rig,
    Truth,
    drain,
    lost_marks,
    minute,
    open_rig,
    per_event,
    server,
    window,
)

pytestmark = pytest.mark.integration
__all__ = ["server"]  # the emulator fixture, shared with the delivery tests


@pytest.fixture
def whole(server: EmulatorServer, tmp_path: Path) -> Iterator[Rig]:
    """Sum meters in whole format (the default); storage_gb, a `last` meter, in decimal."""
    rig = open_rig(server, tmp_path, METERS)
    rig.control("config", whole_values_only=True)  # Stripe's documented rule, enforced
    try:
        yield rig
    finally:
        rig.store.close()


def floor(v: Decimal) -> Decimal:
    return v.to_integral_value(ROUND_FLOOR)


def seed_fractions(rig: Rig, truth: Truth, start_ms: int, tag: str) -> None:
    for n, value in enumerate(("0.4", "0.4", "0.4", "1.9", "2.25")):
        per_event(rig, truth, "tokens", "cus_a", f"{tag}{n}", value, start_ms + 1000 * n)
    per_event(rig, truth, "tokens", "cus_b", f"{tag}b", "0.75", start_ms)
    for c in ("cus_a", "cus_b"):
        window(rig, truth, c, start_ms, "7.5")
        window(rig, truth, c, start_ms + MINUTE_MS, "0.25")


def sent_values(rig: Rig) -> list[str]:
    return [format(e.value, "f") for e in rig.server.state.stored_events()]


def test_whole_numbers_carry_fractions_and_stripe_bills_the_floor_of_the_usage(
    whole: Rig,
) -> None:
    truth: Truth = {}
    seed_fractions(whole, truth, minute(whole.now_ms() - 2 * HOUR_MS), "a")
    emitter = whole.emitter()
    drain(emitter)
    assert all(v == floor(v) for v in truth.values()) is False  # the test needs fractions
    assert whole.billed() == {k: floor(v) for k, v in truth.items() if floor(v)}
    assert all("." not in v for v in sent_values(whole))
    # more usage: the carried fractions are billed once they make a whole unit
    seed_fractions(whole, truth, minute(whole.now_ms() - HOUR_MS), "b")
    drain(emitter)
    emitter.close()
    assert whole.billed() == {k: floor(v) for k, v in truth.items()}
    statuses = {s for s, _, _ in whole.statuses().values()}
    assert statuses == {"sent"}  # a push with nothing whole to send is done, not pending
    assert whole.snapshot()["events_rejected_async"] == 0


def test_a_re_send_after_a_lost_mark_repeats_the_same_amounts(whole: Rig) -> None:
    truth: Truth = {}
    seed_fractions(whole, truth, minute(whole.now_ms() - 2 * HOUR_MS), "a")
    lost_marks(whole)  # Stripe holds the first sends; none is marked
    first = sorted(sent_values(whole))
    emitter = whole.emitter()
    drain(emitter)  # re-sent with the amounts fixed before the first send
    emitter.close()
    assert whole.billed() == {k: floor(v) for k, v in truth.items() if floor(v)}
    assert sorted(sent_values(whole)) == first
    assert max(whole.stored_per_identifier().values()) == 1


def test_a_value_over_15_digits_arrives_split_and_exact(whole: Rig) -> None:
    truth: Truth = {}
    big = "1234567890123456"  # 16 significant digits
    window(whole, truth, "cus_big", minute(whole.now_ms() - HOUR_MS), big)
    emitter = whole.emitter()
    drain(emitter)
    emitter.close()
    assert whole.billed() == {("api_calls", "cus_big"): Decimal(big)}
    values = sent_values(whole)
    assert len(values) == 2 and all(len(v) <= 15 for v in values)


def test_a_value_too_large_for_one_request_is_held_with_its_reason(whole: Rig) -> None:
    truth: Truth = {}
    huge = str(10**17 + 1)  # 101 events of at most 15 digits
    window(whole, truth, "cus_huge", minute(whole.now_ms() - HOUR_MS), huge)
    emitter = whole.emitter()
    drain(emitter)
    emitter.close()
    assert whole.billed() == {}
    ((status, reason, _),) = whole.statuses().values()
    assert status == "rejected" and "needs 101 meter events" in reason


def test_a_cycle_of_pushes_with_nothing_whole_to_send_is_not_an_idle_outbox(whole: Rig) -> None:
    """More fractions than one cycle takes, all settled without a request: the outbox is
    not drained until the push that completes a whole unit is sent."""
    start = minute(whole.now_ms() - HOUR_MS)
    pushes = [
        Push(
            per_event_identifier("tokens", f"tiny{n:04d}"),
            "per_event",
            "tokens",
            "tokens",
            "cus_t",
            start + n,
            0,
            Decimal("0.001"),
            0,
        )
        for n in range(1000)
    ]
    outbox.write(whole.store, pushes, PENDING, whole.now_ms())
    emitter = whole.emitter()  # 2 x 100 events x 4 = 800 pushes a cycle
    drain(emitter)
    emitter.close()
    assert whole.billed() == {("tokens", "cus_t"): Decimal(1)}
