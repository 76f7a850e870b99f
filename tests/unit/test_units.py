"""What pushes send: whole numbers with carried fractions, exact decimals, split values."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from consumer.emitter.plan.outbox import ATTEMPTED, PENDING, REJECTED, SENT, Push
from consumer.emitter.plan.units import (
    MAX_WHOLE,
    Rule,
    part_count,
    parts,
    settle,
    significant_digits,
)
from consumer.exact import EXACT, exact, exact_sum

WHOLE_SUM = {"m": Rule("whole", True)}
values = st.decimals(min_value=0, max_value=10**6, places=9, allow_nan=False)


def push(i: int, value: Decimal, meter: str = "m", customer: str = "c") -> Push:
    return Push(f"id{i:05d}", "per_event", meter, meter, customer, i, 0, value, 0)


def sent(pushes: list[Push]) -> Decimal:
    return exact_sum(p.sent or Decimal(0) for p in pushes)


@given(st.decimals(min_value=0, max_value=Decimal("1e17"), places=9, allow_nan=False))
def test_parts_add_up_exactly_and_each_has_at_most_15_digits(amount: Decimal) -> None:
    for fmt in ("whole", "decimal"):
        if fmt == "whole":
            amount = amount.to_integral_value("ROUND_FLOOR")
        out = parts(amount, fmt)
        assert part_count(amount, fmt) == len(out)
        assert exact_sum(Decimal(v) for v in out) == amount
        assert all(significant_digits(Decimal(v)) <= 15 for v in out)
        assert (out == []) == (amount == 0)
        if fmt == "whole":
            assert all("." not in v for v in out)


@given(st.decimals(min_value=-(10**20), max_value=10**20, places=9, allow_nan=False))
def test_significant_digits_counts_the_digits_of_the_exact_string(value: Decimal) -> None:
    digits = exact(value).replace("-", "").replace(".", "").lstrip("0")
    assert significant_digits(value) == max(1, len(digits))


def test_a_value_within_15_digits_is_one_event_as_it_is() -> None:
    assert parts(Decimal("123456.789"), "decimal") == ["123456.789"]
    assert parts(Decimal("999999999999999"), "whole") == ["999999999999999"]
    assert parts(Decimal("1000000000000000"), "whole") == [str(MAX_WHOLE), "1"]


@given(st.lists(values, max_size=40))
def test_whole_sends_never_exceed_usage_and_trail_it_by_less_than_one(vals: list[Decimal]) -> None:
    out = settle([push(i, v) for i, v in enumerate(vals)], WHOLE_SUM, {}, ATTEMPTED, 7)
    for k in range(len(out) + 1):
        usage, billed = exact_sum(vals[:k]), sent(out[:k])
        assert billed == usage.to_integral_value("ROUND_FLOOR")
    assert all(p.sent == p.sent.to_integral_value() for p in out if p.sent is not None)
    assert all(p.first_attempt_ms == 7 for p in out)
    # nothing to send is delivered without a request; everything else waits to be sent
    assert all((p.status == SENT) == (p.sent == 0) for p in out)
    assert {p.status for p in out} <= {SENT, ATTEMPTED}


@given(st.lists(values, min_size=1, max_size=30), st.data())
def test_assigning_in_several_cycles_sends_what_one_cycle_would(
    vals: list[Decimal], data: st.DataObject
) -> None:
    """The carry is re-read from what earlier cycles wrote (usage assigned minus sent), so a
    crash between cycles, or any batching, changes no amount."""
    pushes = [push(i, v) for i, v in enumerate(vals)]
    whole = settle(pushes, WHOLE_SUM, {}, ATTEMPTED, 1)
    done: list[Push] = []
    rest = pushes
    while rest:
        n = data.draw(st.integers(1, len(rest)))
        carry = {("m", "c"): EXACT.subtract(exact_sum(p.value for p in done), sent(done))}
        done += settle(rest[:n], WHOLE_SUM, carry, ATTEMPTED, 1)
        rest = rest[n:]
    assert [p.sent for p in done] == [p.sent for p in whole]


def test_fractions_carry_per_meter_and_customer() -> None:
    half = Decimal("0.5")
    rules = {"m": Rule("whole", True), "n": Rule("whole", True)}
    out = settle(
        [push(0, half), push(1, half, customer="d"), push(2, half, meter="n"), push(3, half)],
        rules,
        {},
        ATTEMPTED,
        1,
    )
    assert [p.sent for p in out] == [0, 0, 0, 1]


def test_an_amount_already_fixed_is_kept_and_re_dated() -> None:
    p = push(0, Decimal("2.5")).moved(ATTEMPTED, first_attempt_ms=3, sent=Decimal(2))
    (again,) = settle([p], WHOLE_SUM, {("m", "c"): Decimal("0.9")}, ATTEMPTED, 9)
    assert again.sent == 2 and again.first_attempt_ms == 9


def test_decimal_format_sends_the_exact_value() -> None:
    out = settle([push(0, Decimal("1.25"))], {"m": Rule("decimal", True)}, {}, ATTEMPTED, 1)
    assert out[0].sent == Decimal("1.25") and out[0].status == ATTEMPTED


def test_a_fractional_last_value_in_whole_format_is_refused_with_its_reason_not_rounded() -> None:
    last = {"m": Rule("whole", False)}
    frac, whole = settle([push(0, Decimal("2.5")), push(1, Decimal(3))], last, {}, ATTEMPTED, 1)
    assert frac.status == REJECTED and "not a whole number" in frac.reason
    assert whole.status == ATTEMPTED and whole.sent == 3


def test_a_value_needing_more_than_one_request_is_refused_and_carries_nothing() -> None:
    huge = Decimal(MAX_WHOLE) * 101
    carry = {("m", "c"): Decimal("0.5")}
    big, small = settle([push(0, huge), push(1, Decimal("0.5"))], WHOLE_SUM, carry, ATTEMPTED, 1)
    assert big.status == REJECTED and "needs 101 meter events" in big.reason
    assert small.sent == 1  # the earlier 0.5 and this 0.5; the refused value left no trace


def test_a_never_sent_push_keeps_its_rank_when_moved_by_the_caller() -> None:
    (p,) = settle([push(0, Decimal(4))], WHOLE_SUM, {}, PENDING, 1)
    assert p.status == PENDING and p.sent == 4


def test_a_count_meter_sends_one_per_event_whatever_its_value() -> None:
    count = {"m": Rule("whole", False, one=True)}
    out = settle([push(0, Decimal("0.25")), push(1, Decimal(0))], count, {}, ATTEMPTED, 1)
    assert [(p.status, p.sent) for p in out] == [(ATTEMPTED, Decimal(1))] * 2
