"""Delivery truth without services: the summary check, the time thresholds, report parsing."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.config import StripeConfig
from consumer.emitter.plan.outbox import (
    ATTEMPTED,
    EXPIRED,
    PENDING,
    REDATED,
    REJECTED,
    SENT,
    SENT_V1,
    Push,
)
from consumer.emitter.send.sender import to_events
from consumer.emitter.truth.delivery import (
    DAY_MS,
    HOUR_MS,
    MAX_UNKNOWN,
    MINUTE_MS,
    DeliveryPolicy,
    Landed,
    Unclear,
    judge,
)
from consumer.emitter.truth.error_reports import parse_ms, parse_report

T = 1_767_225_600_000


def push(ident: str, value: str, status: int = ATTEMPTED, first: int = T) -> Push:
    return Push(
        ident, "per_event", "tokens", "tokens", "cus_a", T, 0, Decimal(value), first, status
    )


# -- judge ------------------------------------------------------------------------------------


def test_every_unknown_push_landed() -> None:
    rows = [push("a", "1"), push("b", "2"), push("c", "4")]
    assert judge(Decimal(7), rows, "sum") == Landed(frozenset({"a", "b", "c"}))


def test_none_landed() -> None:
    assert judge(Decimal(0), [push("a", "1"), push("b", "2")], "sum") == Landed(frozenset())


def test_known_deliveries_are_subtracted_and_others_ignored() -> None:
    rows = [
        push("sent", "10", SENT),
        push("legacy", "5", SENT_V1),
        push("rejected", "100", REJECTED),
        push("expired", "1000", EXPIRED),
        push("fresh", "3", PENDING, first=0),  # never attempted: cannot have landed
        push("a", "2"),
        push("b", "7"),
    ]
    assert judge(Decimal(22), rows, "sum") == Landed(frozenset({"b"}))


def test_legacy_rank_1_with_an_attempt_and_redated_pushes_are_unknown() -> None:
    rows = [push("old", "1", PENDING, first=T), push("re", "2", REDATED)]
    assert judge(Decimal(2), rows, "sum") == Landed(frozenset({"re"}))


def test_equal_weights_where_only_one_landed_are_ambiguous() -> None:
    verdict = judge(Decimal(3), [push("a", "3"), push("b", "3")], "sum")
    assert isinstance(verdict, Unclear)
    assert "2 combinations" in verdict.reason


def test_a_summary_no_subset_explains_is_held() -> None:
    verdict = judge(Decimal("2.5"), [push("a", "1"), push("b", "2")], "sum")
    assert isinstance(verdict, Unclear) and "no combination" in verdict.reason


def test_a_summary_below_what_was_marked_delivered_is_held() -> None:
    verdict = judge(Decimal(4), [push("s", "5", SENT), push("a", "1")], "sum")
    assert isinstance(verdict, Unclear)


def test_count_meters_weigh_each_event_one() -> None:
    rows = [push("a", "5"), push("b", "9"), push("s", "7", SENT)]
    assert isinstance(judge(Decimal(2), rows, "count"), Unclear)  # a or b: can't tell
    assert judge(Decimal(1), rows, "count") == Landed(frozenset())
    assert judge(Decimal(3), rows, "count") == Landed(frozenset({"a", "b"}))


def test_zero_weight_pushes_never_make_a_minute_ambiguous() -> None:
    rows = [push("zero", "0"), push("a", "4")]
    assert judge(Decimal(4), rows, "sum") == Landed(frozenset({"a"}))  # zero: sent again


def test_last_meter_decides_only_a_lone_push() -> None:
    assert judge(Decimal(42), [push("a", "42")], "last") == Landed(frozenset({"a"}))
    assert judge(Decimal(0), [push("a", "42")], "last") == Landed(frozenset())
    assert isinstance(judge(Decimal(0), [push("a", "0")], "last"), Unclear)
    assert isinstance(judge(Decimal(1), [push("a", "1"), push("b", "2")], "last"), Unclear)
    assert isinstance(judge(Decimal(1), [push("a", "1"), push("s", "1", SENT)], "last"), Unclear)


def test_event_time_window_meters_are_not_additive() -> None:
    assert isinstance(judge(Decimal(3), [push("a", "1"), push("b", "2")], "sum", "hour"), Unclear)


def test_too_many_unknown_pushes_in_one_minute_are_held() -> None:
    rows = [push(f"p{n}", str(2**n)) for n in range(MAX_UNKNOWN + 1)]
    assert isinstance(judge(Decimal(1), rows, "sum"), Unclear)
    assert judge(Decimal(2**MAX_UNKNOWN - 1), rows[:MAX_UNKNOWN], "sum") == Landed(
        frozenset(p.identifier for p in rows[:MAX_UNKNOWN])
    )


def test_float_summaries_match_exact_decimals() -> None:
    rows = [push("a", "0.1"), push("b", "0.2"), push("c", "123456789.123456789")]
    summary = Decimal(repr(0.1 + 0.2))  # 0.30000000000000004
    assert judge(summary, rows, "sum") == Landed(frozenset({"a", "b"}))
    big = Decimal(repr(float(Decimal("123456789.123456789") + Decimal("0.1"))))
    assert judge(big, rows, "sum") == Landed(frozenset({"a", "c"}))


@given(
    st.lists(st.integers(1, 10**6), min_size=1, max_size=10, unique=True),
    st.data(),
)
def test_distinct_powers_of_two_are_always_told_apart(exps: list[int], data: st.DataObject) -> None:
    """With weights no two subsets share, the check recovers exactly what landed."""
    rows = [push(f"p{i}", str(2**i)) for i in range(len(exps))]
    landed = data.draw(st.sets(st.sampled_from([p.identifier for p in rows])))
    summary = sum((p.value for p in rows if p.identifier in landed), Decimal(0))
    assert judge(summary, rows, "sum") == Landed(frozenset(landed))


@given(st.lists(st.integers(0, 50), min_size=1, max_size=8), st.data())
def test_never_claims_a_wrong_answer(values: list[int], data: st.DataObject) -> None:
    """Whatever landed, the verdict is either that set exactly or a hold."""
    rows = [push(f"p{i}", str(v)) for i, v in enumerate(values)]
    landed = data.draw(st.sets(st.sampled_from([p.identifier for p in rows])))
    summary = sum((p.value for p in rows if p.identifier in landed), Decimal(0))
    verdict = judge(summary, rows, "sum")
    if isinstance(verdict, Landed):
        nonzero = {p.identifier for p in rows if p.value != 0}
        assert verdict.identifiers == landed & nonzero


# -- thresholds -------------------------------------------------------------------------------


def test_policy_defaults_follow_the_config() -> None:
    policy = DeliveryPolicy.from_config(StripeConfig())
    assert policy == DeliveryPolicy()
    assert policy.blind_after_ms(T) == T - 19 * HOUR_MS
    assert policy.due_ms(T) == T - 20 * HOUR_MS
    assert policy.limit_ms(T) == T - 35 * DAY_MS + HOUR_MS


def test_redate_is_the_first_whole_minute_inside_the_limit() -> None:
    policy = DeliveryPolicy(margin_ms=0)
    assert policy.redate_ms(T) == T - 35 * DAY_MS
    assert policy.redate_ms(T + 1) == T - 35 * DAY_MS + MINUTE_MS
    assert policy.redate_ms(T + 1) >= policy.limit_ms(T + 1)


def test_config_keeps_the_blind_window_well_inside_stripes_24_hours() -> None:
    with pytest.raises(ValueError, match="verify_after_hours"):
        StripeConfig(verify_after_hours=2, verify_settle_seconds=2 * 3600)
    with pytest.raises(ValueError):
        StripeConfig(verify_after_hours=24)
    StripeConfig(verify_after_hours=23, verify_settle_seconds=3600, past_limit_policy="redate")


def test_a_redated_push_is_sent_with_its_new_timestamp() -> None:
    p = push("a", "1").moved(REDATED, stripe_ms=T + MINUTE_MS)
    assert to_events(p)[0]["timestamp"] == "2026-01-01T00:01:00.000Z"
    assert to_events(push("a", "1"))[0]["timestamp"] == "2026-01-01T00:00:00.000Z"


# -- error reports ----------------------------------------------------------------------------


def test_report_samples_become_rejections_and_the_rest_is_counted() -> None:
    event = {
        "type": "v1.billing.meter.error_report_triggered",
        "data": {
            "reason": {
                "error_count": 5,
                "error_types": [
                    {
                        "code": "meter_event_customer_not_found",
                        "error_count": 3,
                        "sample_errors": [
                            {"error_message": "No such customer", "request": {"identifier": "x"}},
                            {"error_message": "No such customer", "request": {"identifier": "y"}},
                        ],
                    },
                    {"code": "no_meter", "error_count": 2, "sample_errors": [{"request": {}}]},
                ],
            }
        },
    }
    named, unnamed = parse_report(event)
    assert [(r.identifier, r.code) for r in named] == [
        ("x", "meter_event_customer_not_found"),
        ("y", "meter_event_customer_not_found"),
    ]
    assert unnamed == 3


def test_malformed_reports_name_nothing() -> None:
    assert parse_report({}) == ([], 0)
    assert parse_report({"data": {"reason": {"error_types": [None, {"code": 1}]}}}) == ([], 0)


def test_report_times_parse_to_milliseconds() -> None:
    assert parse_ms("2026-01-01T00:00:00.123Z") == T + 123
    assert parse_ms("2026-01-01T00:00:00z") == T
