"""The emulator's Stripe rules, exercised on State directly with a hand-moved clock."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.local.emulator.errors import EmulatorError
from consumer.local.emulator.formats import (
    format_decimal,
    format_rfc3339,
    parse_form,
    parse_rfc3339,
)
from consumer.local.emulator.state import EmulatorOptions, State

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, a UTC midnight
DAY = 86400.0


class Clock:
    """Epoch seconds that only move when a test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(**options: Any) -> tuple[State, Clock, str]:
    """A state with a session token ready for the stream."""
    clock = Clock()
    state = State(clock, EmulatorOptions(**options))
    token = state.create_session()["authentication_token"]
    return state, clock, token


def meter(state: State, event_name: str = "api_calls", formula: str = "sum", **extra: Any) -> str:
    params: dict[str, object] = {
        "display_name": event_name,
        "event_name": event_name,
        "default_aggregation": {"formula": formula},
        **extra,
    }
    return str(state.create_meter(params)["id"])


def ev(
    identifier: str | None = None,
    value: str = "1",
    customer: str = "cus_a",
    event_name: str = "api_calls",
    timestamp: float | None = None,
) -> dict[str, object]:
    event: dict[str, object] = {
        "event_name": event_name,
        "payload": {"stripe_customer_id": customer, "value": value},
    }
    if identifier is not None:
        event["identifier"] = identifier
    if timestamp is not None:
        event["timestamp"] = format_rfc3339(timestamp)
    return event


def send(state: State, token: str, *events: Mapping[str, object]) -> dict[str, Any]:
    return state.stream(token, {"events": list(events)})


def totals(state: State) -> dict[tuple[str, str], str]:
    rows = state.snapshot()["totals"]
    return {(r["event_name"], r["customer"]): r["value"] for r in rows}


def error_codes(state: State) -> list[str]:
    feed = state.error_reports({})["data"]
    return [t["code"] for e in feed for t in e["data"]["reason"]["error_types"]]


class _Raises:
    """Asserts an EmulatorError with the expected code (str) or status (int); keeps it."""

    def __init__(self, expected: str | int) -> None:
        self.expected = expected
        self.error: EmulatorError | None = None

    def __enter__(self) -> _Raises:
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> bool:
        assert isinstance(exc, EmulatorError), f"expected EmulatorError, got {exc!r}"
        self.error = exc
        got = exc.code if isinstance(self.expected, str) else exc.status
        assert got == self.expected, exc.body
        return True


def raises(code_or_status: str | int) -> _Raises:
    return _Raises(code_or_status)


# -- duplicates --------------------------------------------------------------------------


def test_duplicate_drop_answers_200_and_stores_once() -> None:
    state, _, token = make(duplicate_answer="drop")
    meter(state)
    assert send(state, token, ev("a", "2")) == {}
    assert send(state, token, ev("a", "5"), ev("b", "3")) == {}
    assert totals(state) == {("api_calls", "cus_a"): "5"}
    assert state.snapshot()["duplicates"] == 1


def test_duplicate_reject_event_keeps_the_other_events() -> None:
    state, _, token = make(duplicate_answer="reject_event")
    meter(state)
    send(state, token, ev("dup_7", "2"))
    with raises("duplicate_meter_event") as caught:
        send(state, token, ev("dup_7", "5"), ev("b", "3"))
    assert caught.error is not None
    assert caught.error.status == 400
    assert "dup_7" in str(caught.error.body["error"]["message"])
    assert caught.error.headers["Stripe-Should-Retry"] == "false"
    assert totals(state) == {("api_calls", "cus_a"): "5"}


def test_duplicate_reject_request_stores_nothing_from_the_request() -> None:
    state, _, token = make(duplicate_answer="reject_request")
    meter(state)
    send(state, token, ev("a", "2"))
    with raises("duplicate_meter_event"):
        send(state, token, ev("b", "3"), ev("a", "5"))
    assert totals(state) == {("api_calls", "cus_a"): "2"}
    assert [e.identifier for e in state.stored_events()] == ["a"]


@pytest.mark.parametrize(("names", "shown"), [("all", ["a", "c"]), ("first", ["a"]), ("none", [])])
def test_duplicate_answer_names_all_the_first_or_none(names: str, shown: list[str]) -> None:
    state, _, token = make(duplicate_answer="reject_request", duplicate_names=names)
    meter(state)
    send(state, token, ev("a"), ev("c"))
    with raises("duplicate_meter_event") as caught:
        send(state, token, ev("b"), ev("a"), ev("c"))
    assert caught.error is not None
    message = str(caught.error.body["error"]["message"])
    words = message.replace(",", " ").replace(".", " ").split()
    assert [i for i in ("a", "b", "c") if i in words] == shown
    assert state.snapshot()["duplicate_requests"] == 1


def test_a_repeated_idempotency_key_replays_the_success_without_storing() -> None:
    state, _, token = make(duplicate_answer="reject_request")
    meter(state)
    body = {"events": [ev("a", "2")]}
    assert state.stream(token, body, "k1") == {}
    assert state.stream(token, body, "k1") == {}  # a retry after a lost answer
    assert totals(state) == {("api_calls", "cus_a"): "2"}
    snap = state.snapshot()
    assert (snap["idempotent_replays"], snap["duplicate_requests"]) == (1, 0)
    with raises(400) as caught:
        state.stream(token, {"events": [ev("b", "2")]}, "k1")
    assert caught.error is not None and caught.error.body["error"]["type"] == "idempotency_error"


def test_a_failed_request_runs_again_under_its_key_and_keys_can_be_off() -> None:
    state, _, token = make(duplicate_answer="reject_request")
    meter(state)
    send(state, token, ev("a"))
    with raises("duplicate_meter_event"):
        state.stream(token, {"events": [ev("a"), ev("b")]}, "k2")
    with raises("duplicate_meter_event"):  # failed work is not cached
        state.stream(token, {"events": [ev("a"), ev("b")]}, "k2")
    state.configure({"idempotency": "false"})
    assert state.stream(token, {"events": [ev("c")]}, "k3") == {}
    with raises("duplicate_meter_event"):
        state.stream(token, {"events": [ev("c")]}, "k3")


def test_duplicate_within_one_request_is_a_duplicate() -> None:
    state, _, token = make(duplicate_answer="reject_request")
    meter(state)
    with raises("duplicate_meter_event"):
        send(state, token, ev("x", "1"), ev("x", "1"))
    assert state.stored_events() == []


def test_identifier_is_free_again_after_the_dedup_window() -> None:
    state, clock, _ = make(duplicate_answer="reject_request", dedup_window_seconds=60)
    meter(state)
    token = state.create_session()["authentication_token"]
    send(state, token, ev("a", "2"))
    clock.now += 59
    with raises("duplicate_meter_event"):
        send(state, token, ev("a", "2"))
    clock.now += 1
    send(state, token, ev("a", "2"))
    assert totals(state) == {("api_calls", "cus_a"): "4"}


def test_identifiers_are_forgotten_after_24_hours_so_a_late_copy_bills_twice() -> None:
    state, _, token = make()
    meter(state)
    send(state, token, ev("a", "2"))
    state.set_clock_offset(23 * 3600)  # the controllable clock, as /_emulator/clock moves it
    token = state.create_session()["authentication_token"]
    send(state, token, ev("a", "2"))
    assert totals(state) == {("api_calls", "cus_a"): "2"}
    assert state.snapshot()["identifiers_remembered"] == 1
    state.set_clock_offset(25 * 3600)
    assert state.snapshot()["identifiers_remembered"] == 0
    token = state.create_session()["authentication_token"]
    send(state, token, ev("a", "2"))
    assert totals(state) == {("api_calls", "cus_a"): "4"}
    assert state.snapshot()["duplicates"] == 1


def test_the_memory_is_24_hours_from_first_receipt_in_receipt_order() -> None:
    state, clock, token = make()
    meter(state)
    send(state, token, ev("a"))
    clock.now += 10 * 3600
    token = state.create_session()["authentication_token"]
    send(state, token, ev("b"), ev("a"))  # a's copy does not extend a's memory
    clock.now += 15 * 3600  # a: 25 h, b: 15 h
    token = state.create_session()["authentication_token"]
    send(state, token, ev("a"), ev("b"))
    assert [e.identifier for e in state.stored_events()] == ["a", "b", "a"]
    assert state.snapshot()["identifiers_remembered"] == 2
    clock.now += 10 * 3600  # b: 25 h, the second a: 10 h
    assert state.snapshot()["identifiers_remembered"] == 1
    token = state.create_session()["authentication_token"]
    send(state, token, ev("a"), ev("b"))
    assert [e.identifier for e in state.stored_events()] == ["a", "b", "a", "b"]


def test_unknown_customers_are_rejected_after_the_200() -> None:
    state, _, token = make(unknown_customers="cus_gone, cus_never")
    meter(state)
    assert send(state, token, ev("ok", "1"), ev("gone", "2", customer="cus_gone")) == {}
    assert totals(state) == {("api_calls", "cus_a"): "1"}
    (report,) = state.error_reports({})["data"]
    (kind,) = report["data"]["reason"]["error_types"]
    assert kind["code"] == "meter_event_customer_not_found"
    assert kind["sample_errors"][0]["request"]["identifier"] == "gone"
    state.configure({"unknown_customers": ""})
    send(state, token, ev("back", "2", customer="cus_gone"))
    assert totals(state)[("api_calls", "cus_gone")] == "2"


def test_missing_identifier_gets_a_generated_unique_one() -> None:
    state, _, token = make()
    meter(state)
    send(state, token, ev(None, "1"), ev(None, "1"))
    identifiers = {e.identifier for e in state.stored_events()}
    assert len(identifiers) == 2


# -- synchronous shape checks ------------------------------------------------------------


def test_hundred_events_pass_and_one_more_is_refused() -> None:
    state, _, token = make()
    meter(state)
    send(state, token, *[ev(f"i{n}") for n in range(100)])
    with raises(400):
        send(state, token, *[ev(f"j{n}") for n in range(101)])
    assert state.snapshot()["events_accepted"] == 100


@pytest.mark.parametrize(
    "body",
    [
        {"events": []},
        {},
        {"events": "nope"},
        None,
        {"events": [{"payload": {"value": "1"}}]},
        {"events": [{"event_name": "api_calls"}]},
        {"events": [{"event_name": "api_calls", "payload": {"value": 1}}]},
        {"events": [{"event_name": "api_calls", "payload": {"value": None}}]},
        {"events": [{"event_name": "api_calls", "payload": {}, "timestamp": 1767225600}]},
        {"events": [{"event_name": "api_calls", "payload": {}, "timestamp": "2026-01-01"}]},
        {"events": [{"event_name": "api_calls", "payload": {}, "timestamp": "2026-01-01T00:00"}]},
        {"events": [{"event_name": "api_calls", "payload": {}, "extra": "x"}]},
    ],
)
def test_malformed_stream_bodies_are_400_invalid_request(body: object) -> None:
    state, _, token = make()
    meter(state)
    with raises(400) as caught:
        state.stream(token, body)
    assert caught.error is not None
    assert caught.error.body["error"]["type"] == "invalid_request_error"
    assert caught.error.body["error"]["message"]
    assert state.stored_events() == []


def test_non_string_payload_value_names_the_field() -> None:
    state, _, token = make()
    with raises(400) as caught:
        state.stream(token, {"events": [{"event_name": "e", "payload": {"value": 5}}]})
    assert caught.error is not None
    assert "events[0].payload.value" in caught.error.body["error"]["message"]


# -- sessions ----------------------------------------------------------------------------


def test_session_expires_by_the_injected_clock() -> None:
    state, clock, token = make(token_lifetime_seconds=900)
    meter(state)
    clock.now += 899.9
    send(state, token, ev("a"))
    clock.now += 0.1
    with raises("billing_meter_event_session_expired") as caught:
        send(state, token, ev("b"))
    assert caught.error is not None
    assert caught.error.status == 401
    assert caught.error.body["error"]["type"] == "temporary_session_expired"
    assert caught.error.body["error"]["doc_url"].startswith("https://")


def test_session_shape_and_expiry_format() -> None:
    state = State(Clock(T0 + 0.25), EmulatorOptions(token_lifetime_seconds=60))
    session = state.create_session()
    assert session["object"] == "v2.billing.meter_event_session"
    assert session["id"].startswith("mes_")
    assert session["authentication_token"].startswith("mes_tok_")
    assert session["created"] == "2026-01-01T00:00:00.250Z"
    assert session["expires_at"] == "2026-01-01T00:01:00.250Z"
    assert session["livemode"] is False


def test_clock_offset_and_expire_all_end_sessions() -> None:
    state, _, token = make()
    state.set_clock_offset(901)
    with raises("billing_meter_event_session_expired"):
        send(state, token, ev("a"))
    state.set_clock_offset(0)
    fresh = state.create_session()["authentication_token"]
    assert state.expire_sessions() == 2
    with raises("billing_meter_event_session_expired"):
        send(state, fresh, ev("a"))


def test_unknown_token_is_401_invalid_request() -> None:
    state, _, _ = make()
    with raises(401) as caught:
        send(state, "sk_test_not_a_token", ev("a"))
    assert caught.error is not None
    assert caught.error.body["error"]["type"] == "invalid_request_error"


# -- faults ------------------------------------------------------------------------------


def test_fault_knobs_answer_429_and_500_without_storing() -> None:
    state, _, token = make(rate_429=1.0)
    meter(state)
    with raises(429) as caught:
        send(state, token, ev("a"))
    assert caught.error is not None
    assert caught.error.body["error"]["type"] == "rate_limit"
    assert caught.error.headers["Stripe-Should-Retry"] == "true"
    state.configure({"rate_429": 0.0, "rate_5xx": 1.0})
    with raises(500) as caught:
        send(state, token, ev("a"))
    assert caught.error is not None
    assert caught.error.body["error"]["type"] == "api_error"
    assert state.stored_events() == []


def outcomes(seed: int) -> list[int]:
    state, _, token = make(rate_429=0.5, seed=seed)
    meter(state)
    result = []
    for n in range(40):
        try:
            send(state, token, ev(f"e{n}"))
            result.append(200)
        except EmulatorError as exc:
            result.append(exc.status)
    return result


def test_fault_sequence_is_repeatable_from_the_seed() -> None:
    first = outcomes(7)
    assert first == outcomes(7)
    assert 200 in first and 429 in first


def test_drop_rate_answers_ok_but_loses_events() -> None:
    state, _, token = make()
    meter(state)
    state.configure({"drop_rate": 1.0})
    assert send(state, token, ev("a"), ev("b")) == {}
    snapshot = state.snapshot()
    assert snapshot["events_dropped"] == 2
    assert snapshot["events_accepted"] == 0
    assert snapshot["totals"] == []


def test_configure_rejects_unknown_and_out_of_range_and_coerces_strings() -> None:
    state, _, _ = make()
    with raises(400):
        state.configure({"nope": 1})
    with raises(400):
        state.configure({"rate_429": 2})
    with raises(400):
        state.configure({"duplicate_answer": "ignore"})
    updated = state.configure({"rate_5xx": "0.25", "verbose": "true", "seed": "3"})
    assert (updated.rate_5xx, updated.verbose, updated.seed) == (0.25, True, 3)


# -- timestamps and asynchronous validation -----------------------------------------------


def test_timestamp_window_is_checked_on_both_sides() -> None:
    state, _, token = make()
    meter(state)
    send(
        state,
        token,
        ev("old_ok", "1", timestamp=T0 - 35 * DAY + 1),
        ev("new_ok", "2", timestamp=T0 + 300),
        ev("too_old", "4", timestamp=T0 - 35 * DAY - 1),
        ev("too_new", "8", timestamp=T0 + 301),
    )
    assert totals(state) == {("api_calls", "cus_a"): "3"}
    assert sorted(error_codes(state)) == ["timestamp_in_future", "timestamp_too_far_in_past"]


def test_async_failures_reach_the_report_feed_never_the_response() -> None:
    state, _, token = make()
    meter(state)
    no_customer = {"event_name": "api_calls", "payload": {"value": "1"}, "identifier": "nc"}
    answer = send(
        state,
        token,
        ev("unknown", event_name="no_such_meter"),
        ev("abc", "abc"),
        ev("neg", "-1"),
        ev("digits", "1234567890123456"),
        no_customer,
        ev("good", "2"),
    )
    assert answer == {}
    (report,) = state.error_reports({"type": "v1.billing.meter.error_report_triggered"})["data"]
    assert report["object"] == "v2.core.event"
    reason = report["data"]["reason"]
    assert reason["error_count"] == 5
    by_code = {t["code"]: t for t in reason["error_types"]}
    assert by_code["no_meter"]["sample_errors"][0]["request"]["identifier"] == "unknown"
    assert by_code["meter_event_invalid_value"]["error_count"] == 2
    assert set(by_code) == {
        "no_meter",
        "meter_event_invalid_value",
        "meter_event_value_too_many_digits",
        "meter_event_no_customer_defined",
    }
    assert totals(state) == {("api_calls", "cus_a"): "2"}
    assert state.snapshot()["events_rejected_async"] == 5


def test_fifteen_significant_digits_are_fine() -> None:
    state, _, token = make()
    meter(state)
    send(state, token, ev("a", "123456789012345"), ev("b", "0.000000000000001"))
    assert error_codes(state) == []


def test_report_feed_filters_by_type_and_created() -> None:
    state, clock, token = make()
    meter(state)
    send(state, token, ev("x", event_name="nope"))
    first = state.error_reports({})["data"][0]["created"]
    clock.now += 1
    send(state, token, ev("y", event_name="nope"))
    assert len(state.error_reports({})["data"]) == 2
    later = state.error_reports({"created_gt": first})["data"]
    assert [
        e["data"]["reason"]["error_types"][0]["sample_errors"][0]["request"] for e in later
    ] == [{"identifier": "y"}]
    assert len(state.error_reports({"created": {"gte": first}})["data"]) == 2
    assert state.error_reports({"types": {"0": "v1.billing.meter.no_meter_found"}})["data"] == []
    with raises(400):
        state.error_reports({"created_gt": "yesterday"})


def test_deactivated_meter_no_longer_accepts_events() -> None:
    state, _, token = make()
    meter_id = meter(state)
    state.set_meter_active(meter_id, False)
    send(state, token, ev("a"))
    assert error_codes(state) == ["no_meter"]
    state.set_meter_active(meter_id, True)
    send(state, token, ev("b"))
    assert totals(state) == {("api_calls", "cus_a"): "1"}


# -- aggregation -------------------------------------------------------------------------


def test_sum_count_last_formulas() -> None:
    state, _, token = make()
    for name, formula in (("s", "sum"), ("c", "count"), ("l", "last")):
        meter(state, name, formula)
        send(
            state,
            token,
            ev(f"{name}1", "5", event_name=name, timestamp=T0 - 10),
            ev(f"{name}2", "7", event_name=name, timestamp=T0 - 30),
            ev(f"{name}3", "2", event_name=name, timestamp=T0 - 20),
        )
    assert totals(state) == {("s", "cus_a"): "14", ("c", "cus_a"): "3", ("l", "cus_a"): "5"}


def test_last_breaks_timestamp_ties_by_receipt_order() -> None:
    state, _, token = make()
    meter(state, formula="last")
    send(state, token, ev("a", "5", timestamp=T0 - 10), ev("b", "9", timestamp=T0 - 10))
    send(state, token, ev("c", "3", timestamp=T0 - 10))
    assert totals(state) == {("api_calls", "cus_a"): "3"}


def test_count_meter_does_not_need_a_value() -> None:
    state, _, token = make()
    meter(state, formula="count")
    event = {"event_name": "api_calls", "payload": {"stripe_customer_id": "cus_a"}}
    send(state, token, event, event)
    assert totals(state) == {("api_calls", "cus_a"): "2"}


def test_custom_payload_keys() -> None:
    state, _, token = make()
    meter(
        state,
        customer_mapping={"event_payload_key": "account", "type": "by_id"},
        value_settings={"event_payload_key": "tokens"},
    )
    event = {"event_name": "api_calls", "payload": {"account": "cus_z", "tokens": "4"}}
    send(state, token, event)
    assert totals(state) == {("api_calls", "cus_z"): "4"}


def test_event_time_window_keeps_latest_received_per_window() -> None:
    state, _, token = make()
    meter(state, event_time_window="hour")
    hour = T0 - 3 * 3600
    send(state, token, ev("a", "10", timestamp=hour + 100), ev("b", "20", timestamp=hour + 50))
    send(state, token, ev("c", "7", timestamp=hour + 3600))
    assert totals(state) == {("api_calls", "cus_a"): "27"}


def test_totals_are_exact_decimals() -> None:
    state, _, token = make()
    meter(state)
    send(state, token, *[ev(f"t{n}", "0.1") for n in range(10)])
    send(state, token, *[ev(f"u{n}", "0.1", customer="cus_b") for n in range(100)])
    send(state, token, ev("big", "100000000000000", customer="cus_c"))
    send(state, token, ev("small", "0.000000000000001", customer="cus_c"))
    assert totals(state) == {
        ("api_calls", "cus_a"): "1",
        ("api_calls", "cus_b"): "10",
        ("api_calls", "cus_c"): "100000000000000.000000000000001",
    }


def test_cancelled_events_leave_the_totals() -> None:
    state, _, token = make()
    meter(state)
    send(state, token, ev("a", "2"), ev("b", "3"))
    cancel = {"event_name": "api_calls", "type": "cancel", "cancel": {"identifier": "a"}}
    answer = state.cancel_event(cancel, v2=True)
    assert answer["object"] == "v2.billing.meter_event_adjustment"
    assert answer["status"] == "complete"
    assert answer["cancel"] == {"identifier": "a"}
    assert totals(state) == {("api_calls", "cus_a"): "3"}


def test_cancel_only_within_24_hours_of_receipt() -> None:
    state, clock, token = make()
    meter(state)
    send(state, token, ev("a", "2"), ev("b", "3"))
    clock.now += DAY
    v1 = state.cancel_event(
        {"event_name": "api_calls", "type": "cancel", "cancel": {"identifier": "a"}}, v2=False
    )
    assert v1["object"] == "billing.meter_event_adjustment"
    clock.now += 1
    late = {"event_name": "api_calls", "type": "cancel", "cancel": {"identifier": "b"}}
    with raises("invalid_cancel_configuration"):
        state.cancel_event(late, v2=True)
    with raises(400) as caught:
        state.cancel_event(late, v2=False)
    assert caught.error is not None
    assert caught.error.body["error"]["param"] == "cancel[identifier]"
    assert totals(state) == {("api_calls", "cus_a"): "3"}


def test_cancel_unknown_identifier_or_wrong_event_name() -> None:
    state, _, token = make()
    meter(state)
    send(state, token, ev("a"))
    with raises("invalid_cancel_configuration"):
        state.cancel_event({"event_name": "api_calls", "cancel": {"identifier": "zz"}}, v2=True)
    with raises("invalid_cancel_configuration"):
        state.cancel_event({"event_name": "other", "cancel": {"identifier": "a"}}, v2=True)
    with raises(400):
        state.cancel_event({"event_name": "api_calls"}, v2=False)


# -- event summaries ---------------------------------------------------------------------


def summaries(state: State, meter_id: str, **params: object) -> dict[str, Any]:
    return state.event_summaries(meter_id, {"customer": "cus_a", **params})


def test_summaries_without_grouping_cover_the_range() -> None:
    state, _, token = make()
    meter_id = meter(state)
    send(state, token, ev("a", "2", timestamp=T0 - 120), ev("b", "3", timestamp=T0 - 60))
    send(state, token, ev("c", "100", timestamp=T0 - 180), ev("d", "9", customer="cus_b"))
    page = summaries(state, meter_id, start_time=int(T0 - 120), end_time=int(T0))
    (item,) = page["data"]
    assert item["aggregated_value"] == 5.0
    assert (item["start_time"], item["end_time"]) == (int(T0 - 120), int(T0))
    assert item["object"] == "billing.meter_event_summary"
    assert item["id"].startswith("mtrusg_")
    assert item["meter"] == meter_id
    assert page["has_more"] is False


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"start_time": int(T0) + 30, "end_time": int(T0) + 120}, "start_time"),
        ({"start_time": int(T0), "end_time": int(T0) + 90}, "end_time"),
        ({"start_time": int(T0), "end_time": int(T0)}, "start_time"),
        ({"start_time": "soon", "end_time": int(T0)}, "start_time"),
        ({"end_time": int(T0)}, "start_time"),
        (
            {
                "start_time": int(T0) + 60,
                "end_time": int(T0) + 3600,
                "value_grouping_window": "hour",
            },
            "start_time",
        ),
        (
            {"start_time": int(T0), "end_time": int(T0) + 3600, "value_grouping_window": "day"},
            "end_time",
        ),
        (
            {
                "start_time": int(T0) + 3600,
                "end_time": int(T0 + DAY),
                "value_grouping_window": "day",
            },
            "start_time",
        ),
        (
            {"start_time": int(T0), "end_time": int(T0 + DAY), "value_grouping_window": "week"},
            "value_grouping_window",
        ),
    ],
)
def test_summary_alignment_rules(params: dict[str, object], param: str) -> None:
    state, _, _ = make()
    meter_id = meter(state)
    with raises(400) as caught:
        summaries(state, meter_id, **params)
    assert caught.error is not None
    assert caught.error.body["error"]["param"] == param


def test_summaries_need_a_customer_and_a_known_meter() -> None:
    state, _, _ = make()
    meter_id = meter(state)
    with raises(400):
        state.event_summaries(meter_id, {"start_time": int(T0), "end_time": int(T0) + 60})
    with raises(404):
        summaries(state, "mtr_missing", start_time=int(T0), end_time=int(T0) + 60)


def test_hourly_summaries_are_newest_first_and_paginate() -> None:
    state, _, token = make()
    meter_id = meter(state)
    start = int(T0 - 5 * 3600)
    send(state, token, *[ev(f"h{h}", str(h + 1), timestamp=start + h * 3600 + 5) for h in range(5)])
    window = {"start_time": start, "end_time": int(T0), "value_grouping_window": "hour"}
    first = summaries(state, meter_id, limit=2, **window)
    assert [i["aggregated_value"] for i in first["data"]] == [5.0, 4.0]
    assert first["has_more"] is True
    second = summaries(state, meter_id, limit=2, starting_after=first["data"][-1]["id"], **window)
    assert [i["aggregated_value"] for i in second["data"]] == [3.0, 2.0]
    last = summaries(state, meter_id, limit=2, starting_after=second["data"][-1]["id"], **window)
    assert [i["aggregated_value"] for i in last["data"]] == [1.0]
    assert last["has_more"] is False
    back = summaries(state, meter_id, limit=2, ending_before=last["data"][0]["id"], **window)
    assert back["data"] == second["data"]
    assert back["has_more"] is True


def test_daily_summaries_align_to_utc_midnight() -> None:
    state, _, token = make()
    meter_id = meter(state, formula="count")
    send(state, token, ev("a", timestamp=T0 - DAY + 10), ev("b", timestamp=T0 - 10))
    page = summaries(
        state,
        meter_id,
        start_time=int(T0 - 2 * DAY),
        end_time=int(T0),
        value_grouping_window="day",
    )
    assert [(i["start_time"], i["aggregated_value"]) for i in page["data"]] == [
        (int(T0 - DAY), 2.0),
        (int(T0 - 2 * DAY), 0.0),
    ]


def test_summaries_honour_event_time_window_and_cancellation() -> None:
    state, _, token = make()
    meter_id = meter(state, event_time_window="day")
    send(state, token, ev("a", "4", timestamp=T0 - 100), ev("b", "6", timestamp=T0 - 50))
    state.cancel_event({"event_name": "api_calls", "cancel": {"identifier": "b"}}, v2=True)
    page = summaries(state, meter_id, start_time=int(T0 - DAY), end_time=int(T0))
    assert page["data"][0]["aggregated_value"] == 4.0


# -- meters ------------------------------------------------------------------------------


def test_meter_create_checks_and_defaults() -> None:
    state, _, _ = make()
    created = state.create_meter(
        {"display_name": "A", "event_name": "a", "default_aggregation": {"formula": "sum"}}
    )
    assert created["id"].startswith("mtr_test_")
    assert created["customer_mapping"] == {
        "event_payload_key": "stripe_customer_id",
        "type": "by_id",
    }
    assert created["value_settings"] == {"event_payload_key": "value"}
    assert created["status_transitions"] == {"deactivated_at": None}
    assert created["created"] == int(T0)
    bad: list[dict[str, object]] = [
        {"event_name": "b", "default_aggregation": {"formula": "sum"}},
        {"display_name": "B", "event_name": "b"},
        {"display_name": "B", "event_name": "b", "default_aggregation": {"formula": "max"}},
        {"display_name": "B", "event_name": "a", "default_aggregation": {"formula": "sum"}},
        {
            "display_name": "B",
            "event_name": "b",
            "default_aggregation": {"formula": "sum"},
            "event_time_window": "week",
        },
        {
            "display_name": "B",
            "event_name": "b",
            "default_aggregation": {"formula": "sum"},
            "colour": "red",
        },
    ]
    for params in bad:
        with raises(400):
            state.create_meter(params)


def test_meter_update_only_display_name_and_status_changes() -> None:
    state, clock, _ = make()
    meter_id = meter(state)
    clock.now += 10
    assert state.update_meter(meter_id, {"display_name": "New"})["display_name"] == "New"
    with raises(400):
        state.update_meter(meter_id, {"event_name": "other"})
    off = state.set_meter_active(meter_id, False)
    assert (off["status"], off["status_transitions"]["deactivated_at"]) == ("inactive", T0 + 10)
    with raises(400):
        state.set_meter_active(meter_id, False)
    on = state.set_meter_active(meter_id, True)
    assert (on["status"], on["updated"]) == ("active", int(T0 + 10))


def test_meter_list_is_newest_first_with_status_filter_and_paging() -> None:
    state, _, _ = make()
    ids = [meter(state, f"m{n}") for n in range(5)]
    state.set_meter_active(ids[1], False)
    page = state.list_meters({"limit": "2"})
    assert [m["id"] for m in page["data"]] == [ids[4], ids[3]]
    assert page["has_more"] is True and page["url"] == "/v1/billing/meters"
    rest = state.list_meters({"starting_after": ids[3]})
    assert [m["id"] for m in rest["data"]] == [ids[2], ids[1], ids[0]]
    assert [m["id"] for m in state.list_meters({"status": "inactive"})["data"]] == [ids[1]]
    for params in ({"limit": "0"}, {"limit": "101"}, {"status": "gone"}):
        with raises(400):
            state.list_meters(params)


# -- formats -----------------------------------------------------------------------------


def test_format_helpers() -> None:
    assert format_decimal(Decimal("1E+1")) == "10"
    assert format_decimal(Decimal("1.000")) == "1"
    assert format_decimal(Decimal("0.000")) == "0"
    assert format_decimal(Decimal("0.10")) == "0.1"
    assert parse_rfc3339("2026-01-01T00:00:00Z") == T0
    assert parse_rfc3339("2026-01-01T01:00:00.5+01:00") == T0 + 0.5
    assert format_rfc3339(T0 + 1.2345) == "2026-01-01T00:00:01.234Z"
    assert parse_form("a[b][c]=1&d=2&e[0]=x") == {"a": {"b": {"c": "1"}}, "d": "2", "e": {"0": "x"}}


@given(
    st.lists(
        st.decimals(min_value=0, max_value=10**6, places=6, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=40,
    )
)
def test_sum_total_equals_exact_decimal_sum(values: list[Decimal]) -> None:
    state, _, token = make()
    meter(state)
    send(state, token, *[ev(f"p{n}", format_decimal(v)) for n, v in enumerate(values)])
    assert totals(state) == {("api_calls", "cus_a"): format_decimal(sum(values, Decimal(0)))}
