"""Whole-number values against the emulator: fractions carry, nothing is rounded away or
billed twice across a lost mark, and values over 15 digits arrive split but exact."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path

import pytest

from consumer.clock import ManualClock
from consumer.config import load_settings
from consumer.emitter.delivery import HOUR_MS, MINUTE_MS
from consumer.emulator import EmulatorServer
from consumer.metrics import Metrics
from consumer.store import open_store
from consumer.store.migrations import migrate
from tests.integration.conftest import METERS, STRIPE_KEY
from tests.integration.test_stripe_delivery import (
    MarkFailingStore,
    Rig,
    Truth,
    drain,
    lost_marks,
    minute,
    per_event,
    server,
    window,
)

pytestmark = pytest.mark.integration
__all__ = ["server"]  # the emulator fixture, shared with the delivery tests


@pytest.fixture
def whole(server: EmulatorServer, tmp_path: Path) -> Iterator[Rig]:
    """Sum meters in whole format (the default); storage_gb, a `last` meter, in decimal."""
    settings = load_settings(
        clickhouse={"chdb_path": str(tmp_path / "chdb")},
        stripe={
            "api_key": STRIPE_KEY,
            "api_base": server.url,
            "meter_events_base": server.url,
            "requests_per_second": 1000,
            "concurrency": 2,
            "max_retries": 0,
            "poll_interval_seconds": 0.05,
            "error_report_interval_seconds": 0,
        },
        meters=METERS,
    )
    inner = open_store(settings.clickhouse)
    migrate(inner)
    store = MarkFailingStore(inner)
    try:
        yield Rig(server, store, ManualClock(time.time()), settings, Metrics())
    finally:
        store.close()


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
