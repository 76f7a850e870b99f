"""The emulator's connected accounts: apart as Stripe keeps them, knobs shared with the
platform so tests set them once."""

from __future__ import annotations

import pytest

from consumer.local.emulator.errors import EmulatorError
from consumer.local.emulator.routes import Request, stripe_account
from tests.unit.test_emulator_state import ev, make, meter, send, totals


def test_a_connected_account_has_its_own_meters_events_and_identifiers() -> None:
    platform, _, token = make()
    meter(platform)
    acme = platform.account("acct_1Acme")
    assert platform.account("acct_1Acme") is acme and platform.account("") is platform
    acme_token = acme.create_session()["authentication_token"]
    with pytest.raises(EmulatorError):  # a platform token is no session of acme's
        send(acme, token, ev("x"))
    send(acme, acme_token, ev("x", "5"))  # acme has no meter: rejected later, not billed
    assert totals(acme) == {} and acme.snapshot()["events_rejected_async"] == 1
    meter(acme)
    send(acme, acme_token, ev("y", "7"))
    send(platform, token, ev("y", "3"))  # same identifier, other account: not a duplicate
    assert totals(acme) == {("api_calls", "cus_a"): "7"}
    assert totals(platform) == {("api_calls", "cus_a"): "3"}
    assert platform.snapshot()["accounts"]["acct_1Acme"]["totals"] == acme.snapshot()["totals"]


def test_knobs_clock_and_session_expiry_follow_the_platform() -> None:
    platform, clock, _ = make()
    acme = platform.account("acct_1Acme")
    token = acme.create_session()["authentication_token"]
    platform.configure({"duplicate_answer": "reject_event"})
    platform.set_clock_offset(120)
    acme = platform.account("acct_1Acme")
    assert acme.options.duplicate_answer == "reject_event"
    assert acme.now() == platform.now() == clock() + 120
    platform.expire_sessions()
    acme = platform.account("acct_1Acme")
    with pytest.raises(EmulatorError) as err:
        send(acme, token, ev("z"))
    assert err.value.status in (400, 401)


def request(headers: dict[str, str]) -> Request:
    return Request("POST", "/v1/billing/meters", "", b"", headers)


def test_the_account_header_is_read_and_checked() -> None:
    assert stripe_account(request({}), v2=False) == ""
    assert stripe_account(request({"Stripe-Account": "acct_9"}), v2=False) == "acct_9"
    assert stripe_account(request({"stripe-context": "acct_9"}), v2=True) == "acct_9"
    with pytest.raises(EmulatorError) as err:
        stripe_account(request({"Stripe-Account": "cus_1"}), v2=True)
    assert err.value.status == 400 and "No such account" in str(err.value.body)


def test_whole_values_only_refuses_a_fraction_after_the_200() -> None:
    state, _, token = make(whole_values_only=True)
    meter(state)
    send(state, token, ev("a", "2"), ev("b", "2.5"))
    assert totals(state) == {("api_calls", "cus_a"): "2"}
    assert state.snapshot()["events_rejected_async"] == 1
