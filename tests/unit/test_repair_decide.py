"""The repair's decision about one drifting window, without services: what is queued, when
it waits, and what goes to a person."""

from __future__ import annotations

from decimal import Decimal

from consumer.config import MeterConfig
from consumer.emitter.plan.outbox import ATTEMPTED, PENDING, REJECTED, SENT, Push
from consumer.ops import repair
from consumer.ops.reconcile import Line

HOUR = 3600
NOW_MS = 100 * 86_400_000
START = NOW_MS // 1000 - 5 * HOUR
LIMITS = repair.Limits(NOW_MS, 300_000, NOW_MS - 35 * 86_400_000)
SUM = MeterConfig(name="api_calls", event_name="api_call", stripe_event_name="api_calls")
COUNT = MeterConfig(
    name="requests",
    event_name="request",
    stripe_event_name="requests",
    aggregation="count",
    emission="per_event",
)
LAST = MeterConfig(
    name="storage_gb",
    event_name="storage_gb",
    stripe_event_name="storage_gb",
    aggregation="last",
    emission="per_event",
    stripe_value_format="decimal",
)


def line(meter: MeterConfig, delivered: str, stripe: str, start: int = START) -> Line:
    return Line(
        "cus_a", meter.name, start, start + HOUR, delivered=Decimal(delivered),
        stripe=Decimal(stripe),
    )  # fmt: skip


def push(
    meter: MeterConfig,
    value: str,
    at_s: int,
    *,
    status: int = SENT,
    mode: str = "aggregated",
    marked_ms: int = NOW_MS - 3_600_000,
    ident: str = "p",
) -> Push:
    return Push(
        f"{ident}-{at_s}-{value}", mode, meter.name, meter.stripe_event_name or "", "cus_a",
        at_s * 1000, 1, Decimal(value), NOW_MS - 7_200_000, status, updated_ms=marked_ms,
        sent=Decimal(value),
    )  # fmt: skip


def test_a_sum_queues_what_stripe_lacks_at_the_newest_delivered_time() -> None:
    pushes = [push(SUM, "6", START + 60), push(SUM, "4", START + 600)]
    a = repair.decide(SUM, line(SUM, "10", "6"), pushes, Decimal(0), LIMITS)
    assert (a.kind, a.amount, len(a.pushes)) == (repair.SEND, Decimal(4), 1)
    [p] = a.pushes
    assert (p.mode, p.status, p.sent) == ("repair", PENDING, Decimal(4))
    assert p.timestamp_ms == (START + 600) * 1000
    assert p.identifier.startswith("uc1r_")


def test_pushes_marked_within_the_settle_time_wait() -> None:
    pushes = [push(SUM, "10", START + 60, marked_ms=NOW_MS - 1_000)]
    a = repair.decide(SUM, line(SUM, "10", "6"), pushes, Decimal(0), LIMITS)
    assert (a.kind, a.pushes) == (repair.SETTLING, [])


def test_a_repair_on_its_way_is_not_queued_again_and_the_next_one_is_fresh() -> None:
    first = repair.decide(SUM, line(SUM, "10", "6"), [push(SUM, "10", START)], Decimal(0), LIMITS)
    sent = first.pushes[0].moved(ATTEMPTED)
    again = repair.decide(
        SUM, line(SUM, "10", "6"), [push(SUM, "10", START), sent], Decimal(0), LIMITS
    )
    assert (again.kind, again.amount, again.pushes) == (repair.IN_FLIGHT, Decimal(4), [])
    landed = sent.moved(SENT)._replace(updated_ms=NOW_MS - 3_600_000)  # and lost again
    third = repair.decide(
        SUM, line(SUM, "10", "6"), [push(SUM, "10", START), landed], Decimal(0), LIMITS
    )
    assert third.kind == repair.SEND
    assert third.pushes[0].identifier != sent.identifier


def test_a_rejected_repair_and_a_window_past_35_days_go_to_a_person() -> None:
    held = push(SUM, "4", START, status=REJECTED, mode="repair", ident="r")
    a = repair.decide(SUM, line(SUM, "10", "6"), [push(SUM, "10", START), held], Decimal(0), LIMITS)
    assert a.kind == repair.PERSON and "held" in a.reason
    old = (NOW_MS - 40 * 86_400_000) // 1000
    b = repair.decide(SUM, line(SUM, "10", "6", old), [push(SUM, "10", old)], Decimal(0), LIMITS)
    assert b.kind == repair.PERSON and "35-day" in b.reason


def test_a_count_meter_gets_one_event_a_missing_event() -> None:
    a = repair.decide(COUNT, line(COUNT, "5", "2"), [push(COUNT, "1", START)], Decimal(0), LIMITS)
    assert [p.sent for p in a.pushes] == [1, 1, 1]
    assert len({p.identifier for p in a.pushes}) == 3


def test_a_last_value_is_sent_again_once_then_a_person_looks() -> None:
    pushes = [push(LAST, "7.5", START + 60), push(LAST, "3", START + 900)]
    a = repair.decide(LAST, line(LAST, "3", "7.5"), pushes, Decimal(0), LIMITS)
    assert (a.kind, a.pushes[0].sent, a.pushes[0].timestamp_ms) == (
        repair.SEND, Decimal(3), (START + 900) * 1000,
    )  # fmt: skip
    done = a.pushes[0].moved(SENT)._replace(updated_ms=NOW_MS - 3_600_000)
    b = repair.decide(LAST, line(LAST, "3", "7.5"), [*pushes, done], Decimal(0), LIMITS)
    assert b.kind == repair.PERSON and "another writer" in b.reason


def test_late_corrections_are_never_sent_again() -> None:
    a = repair.decide(SUM, line(SUM, "10", "6"), [push(SUM, "10", START)], Decimal(4), LIMITS)
    assert (a.kind, a.pushes) == (repair.COVERED, [])
    b = repair.decide(SUM, line(SUM, "10", "5"), [push(SUM, "10", START)], Decimal(4), LIMITS)
    assert (b.kind, b.amount) == (repair.SEND, Decimal(1))
