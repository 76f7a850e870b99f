"""Validate stage: every dead-letter reason, its boundaries, and the happy path."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest

from consumer.config import MeterConfig
from consumer.decode.event import DecodedEvent
from consumer.decode.validate import DAY_MS, MAX_ID_LENGTH, Invalid, Limits, validate

RECORD_TS = 1_763_000_000_000
API_CALLS = MeterConfig(name="api_calls", event_name="api_call", max_value=Decimal("1000"))
TOKENS = MeterConfig(name="tokens", event_name="tokens")
METERS = {m.event_name: m for m in (API_CALLS, TOKENS)}
LIMITS = Limits(future_tolerance_ms=300_000, max_past_ms=35 * DAY_MS)


def event(**overrides: object) -> DecodedEvent:
    base = DecodedEvent(
        event_id="evt-1",
        event_name="api_call",
        customer_id="cus_123",
        value=Decimal("1.5"),
        timestamp_ms=RECORD_TS - 1_000,
        properties={},
        schema_id=2,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def reason_of(ev: DecodedEvent, record_ts: int = RECORD_TS, limits: Limits = LIMITS) -> str:
    with pytest.raises(Invalid) as info:
        validate(ev, record_ts, METERS, limits)
    assert str(info.value).startswith(info.value.reason + ": ")
    assert info.value.detail
    return info.value.reason


def test_happy_path_returns_the_meter_of_the_event_name() -> None:
    assert validate(event(), RECORD_TS, METERS, LIMITS) is API_CALLS
    assert validate(event(event_name="tokens"), RECORD_TS, METERS, LIMITS) is TOKENS


def test_unknown_event_name_is_unknown_meter() -> None:
    assert reason_of(event(event_name="api_calls")) == "unknown_meter"  # meter name, not event
    assert reason_of(event(event_name="")) == "unknown_meter"


def test_unknown_meter_detail_is_bounded() -> None:
    with pytest.raises(Invalid) as info:
        validate(event(event_name="x" * 10_000), RECORD_TS, METERS, LIMITS)
    assert info.value.reason == "unknown_meter"
    assert len(info.value.detail) < 200


@pytest.mark.parametrize("bad", ["", " ", "\t\n"])
def test_empty_or_blank_event_id_is_missing(bad: str) -> None:
    assert reason_of(event(event_id=bad)) == "missing_event_id"


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_or_blank_customer_id_is_missing(bad: str) -> None:
    assert reason_of(event(customer_id=bad)) == "missing_customer_id"


def test_event_id_length_boundary() -> None:
    assert validate(event(event_id="e" * MAX_ID_LENGTH), RECORD_TS, METERS, LIMITS) is API_CALLS
    assert reason_of(event(event_id="e" * (MAX_ID_LENGTH + 1))) == "event_id_too_long"


def test_customer_id_length_boundary() -> None:
    ok = event(customer_id="c" * MAX_ID_LENGTH)
    assert validate(ok, RECORD_TS, METERS, LIMITS) is API_CALLS
    assert reason_of(event(customer_id="c" * (MAX_ID_LENGTH + 1))) == "customer_id_too_long"


@pytest.mark.parametrize("bad", ["NaN", "sNaN", "Infinity", "-Infinity"])
def test_non_finite_values_are_rejected(bad: str) -> None:
    assert reason_of(event(value=Decimal(bad))) == "value_not_finite"


@pytest.mark.parametrize("bad", ["-0.000000001", "-1", "-1000000"])
def test_negative_values_are_rejected(bad: str) -> None:
    assert reason_of(event(value=Decimal(bad))) == "negative_value"


@pytest.mark.parametrize("ok", ["0", "-0", "0E-9", "0.000000001"])
def test_zero_and_tiny_values_pass(ok: str) -> None:
    assert validate(event(value=Decimal(ok)), RECORD_TS, METERS, LIMITS) is API_CALLS


def test_value_at_max_passes_and_just_above_fails() -> None:
    assert validate(event(value=Decimal("1000")), RECORD_TS, METERS, LIMITS) is API_CALLS
    assert validate(event(value=Decimal("1E+3")), RECORD_TS, METERS, LIMITS) is API_CALLS
    assert reason_of(event(value=Decimal("1000.000000001"))) == "value_too_large"


def test_max_value_is_per_meter() -> None:
    big = Decimal("5000")
    assert reason_of(event(value=big)) == "value_too_large"
    assert validate(event(event_name="tokens", value=big), RECORD_TS, METERS, LIMITS) is TOKENS


def test_timestamp_exactly_at_future_tolerance_passes_one_ms_more_fails() -> None:
    limit = RECORD_TS + LIMITS.future_tolerance_ms
    assert validate(event(timestamp_ms=limit), RECORD_TS, METERS, LIMITS) is API_CALLS
    assert reason_of(event(timestamp_ms=limit + 1)) == "timestamp_in_future"


def test_future_check_is_relative_to_the_record_timestamp_not_the_wall_clock() -> None:
    far = 4_000_000_000_000  # year 2096: far ahead of any wall clock running this test
    assert validate(event(timestamp_ms=far), far, METERS, LIMITS) is API_CALLS
    assert reason_of(event(timestamp_ms=RECORD_TS + 1), record_ts=RECORD_TS - 300_000) == (
        "timestamp_in_future"
    )


def test_zero_future_tolerance() -> None:
    strict = Limits(future_tolerance_ms=0, max_past_ms=LIMITS.max_past_ms)
    assert validate(event(timestamp_ms=RECORD_TS), RECORD_TS, METERS, strict) is API_CALLS
    assert reason_of(event(timestamp_ms=RECORD_TS + 1), limits=strict) == "timestamp_in_future"


def test_timestamp_exactly_at_max_past_passes_one_ms_older_fails() -> None:
    oldest = RECORD_TS - LIMITS.max_past_ms
    assert validate(event(timestamp_ms=oldest), RECORD_TS, METERS, LIMITS) is API_CALLS
    assert reason_of(event(timestamp_ms=oldest - 1)) == "timestamp_too_old"


def test_custom_past_limit_is_honoured() -> None:
    limits = Limits(future_tolerance_ms=0, max_past_ms=DAY_MS)
    assert reason_of(event(timestamp_ms=RECORD_TS - DAY_MS - 1), limits=limits) == (
        "timestamp_too_old"
    )
    assert validate(event(timestamp_ms=RECORD_TS - DAY_MS), RECORD_TS, METERS, limits)


def test_default_limits() -> None:
    assert Limits() == Limits(future_tolerance_ms=300_000, max_past_ms=35 * 86_400_000)


def test_checks_run_in_a_fixed_order() -> None:
    """With several problems, the reason is the first check's: meter, ids, value, time."""
    everything_wrong = event(
        event_name="nope",
        event_id="",
        customer_id="",
        value=Decimal("-1"),
        timestamp_ms=RECORD_TS * 2,
    )
    assert reason_of(everything_wrong) == "unknown_meter"
    assert reason_of(replace(everything_wrong, event_name="api_call")) == "missing_event_id"
    assert reason_of(replace(everything_wrong, event_name="api_call", event_id="e")) == (
        "missing_customer_id"
    )
    assert reason_of(event(value=Decimal("NaN"), timestamp_ms=RECORD_TS * 2)) == (
        "value_not_finite"
    )
    assert reason_of(event(value=Decimal("-1"), timestamp_ms=RECORD_TS * 2)) == "negative_value"
