"""The emulator over real HTTP, driven only through the official ``stripe`` SDK."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import stripe

from consumer.local.emulator import EmulatorOptions, EmulatorServer, serve

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server() -> Iterator[EmulatorServer]:
    emulator = serve("127.0.0.1", 0, EmulatorOptions())
    try:
        yield emulator
    finally:
        emulator.stop()


def client_for(server: EmulatorServer, key: str = "sk_test_x") -> stripe.StripeClient:
    return stripe.StripeClient(key, base_addresses={"api": server.url, "meter_events": server.url})


@pytest.fixture
def client(server: EmulatorServer) -> stripe.StripeClient:
    return client_for(server)


def control(client: stripe.StripeClient, path: str, **params: Any) -> dict[str, Any]:
    """POST to a control endpoint through the SDK's raw_request (form-encoded)."""
    return dict(client.raw_request("post", f"/_emulator/{path}", **params).data)


def snapshot(client: stripe.StripeClient) -> dict[str, Any]:
    return dict(client.raw_request("get", "/_emulator/state").data)


def totals(client: stripe.StripeClient) -> dict[tuple[str, str], str]:
    return {(r["event_name"], r["customer"]): r["value"] for r in snapshot(client)["totals"]}


def make_meter(client: stripe.StripeClient, event_name: str = "api_calls") -> str:
    meter = client.v1.billing.meters.create(
        {
            "display_name": "API calls",
            "event_name": event_name,
            "default_aggregation": {"formula": "sum"},
        }
    )
    return meter.id


def stream(server: EmulatorServer, client: stripe.StripeClient) -> stripe.StripeClient:
    """A client authenticated with a fresh meter event session token."""
    session = client.v2.billing.meter_event_session.create()
    return client_for(server, session.authentication_token)


def ev(identifier: str, value: str = "1", customer: str = "cus_a") -> dict[str, Any]:
    return {
        "event_name": "api_calls",
        "identifier": identifier,
        "payload": {"stripe_customer_id": customer, "value": value},
    }


def send(token_client: stripe.StripeClient, *events: dict[str, Any]) -> None:
    params: Any = {"events": list(events)}
    token_client.v2.billing.meter_event_stream.create(params)


# -- sessions and the stream -------------------------------------------------------------


def test_meter_session_and_stream_round_trip(
    server: EmulatorServer, client: stripe.StripeClient
) -> None:
    make_meter(client)
    session = client.v2.billing.meter_event_session.create()
    assert session.object == "v2.billing.meter_event_session"
    assert session.authentication_token.startswith("mes_tok_")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", session.expires_at)
    token_client = client_for(server, session.authentication_token)
    params: Any = {"events": [ev("a", "2.5"), ev("b", "0.5"), ev("c", "4", customer="cus_b")]}
    result = token_client.v2.billing.meter_event_stream.create(params)  # type: ignore[func-returns-value]
    assert result is None
    assert totals(client) == {("api_calls", "cus_a"): "3", ("api_calls", "cus_b"): "4"}
    requests = snapshot(client)["requests"]
    assert (requests["session"], requests["stream"]) == (1, 1)
    assert requests["by_status"]["200"] >= 3


def test_expired_session_by_clock_jump(server: EmulatorServer, client: stripe.StripeClient) -> None:
    make_meter(client)
    token_client = stream(server, client)
    control(client, "clock", offset_seconds=901)
    with pytest.raises(stripe.TemporarySessionExpiredError) as caught:
        send(token_client, ev("a"))
    assert caught.value.http_status == 401
    assert caught.value.code == "billing_meter_event_session_expired"
    send(stream(server, client), ev("a"))
    assert totals(client) == {("api_calls", "cus_a"): "1"}


def test_expire_sessions_endpoint(server: EmulatorServer, client: stripe.StripeClient) -> None:
    token_client = stream(server, client)
    assert control(client, "expire_sessions") == {"expired": 1}
    with pytest.raises(stripe.TemporarySessionExpiredError):
        send(token_client, ev("a"))


def test_bad_credentials_are_authentication_errors(
    server: EmulatorServer, client: stripe.StripeClient
) -> None:
    with pytest.raises(stripe.AuthenticationError) as caught:
        send(client_for(server, "mes_tok_unknown"), ev("a"))
    body: Any = caught.value.json_body
    assert body["error"]["type"] == "invalid_request_error"
    with pytest.raises(stripe.AuthenticationError):
        client_for(server, "pk_test_x").v2.billing.meter_event_session.create()
    session = client.v2.billing.meter_event_session.create()
    with pytest.raises(stripe.AuthenticationError):
        client_for(server, session.authentication_token).v1.billing.meters.list()


def test_more_than_100_events_is_invalid_request(
    server: EmulatorServer, client: stripe.StripeClient
) -> None:
    make_meter(client)
    token_client = stream(server, client)
    with pytest.raises(stripe.InvalidRequestError) as caught:
        send(token_client, *[ev(f"e{n}") for n in range(101)])
    assert caught.value.http_status == 400
    with pytest.raises(stripe.InvalidRequestError):
        send(token_client, {"event_name": "api_calls", "payload": {"value": 5}})
    assert snapshot(client)["events_accepted"] == 0


def test_fault_knobs(server: EmulatorServer, client: stripe.StripeClient) -> None:
    make_meter(client)
    token_client = stream(server, client)
    control(client, "config", rate_429=1)
    with pytest.raises(stripe.RateLimitError) as limited:
        send(token_client, ev("a"))
    assert limited.value.http_status == 429
    assert limited.value.headers is not None
    assert limited.value.headers.get("Stripe-Should-Retry") == "true"
    control(client, "config", rate_429=0, rate_5xx=1)
    with pytest.raises(stripe.APIError) as failed:
        send(token_client, ev("a"))
    assert failed.value.http_status == 500
    options = control(client, "config", rate_5xx=0, latency_seconds=0.002)
    assert options["latency_seconds"] == 0.002
    send(token_client, ev("a"))
    assert totals(client) == {("api_calls", "cus_a"): "1"}


# -- duplicates --------------------------------------------------------------------------


def test_duplicate_reject_request_stores_nothing(
    server: EmulatorServer, client: stripe.StripeClient
) -> None:
    make_meter(client)
    token_client = stream(server, client)
    send(token_client, ev("dup_7", "2"))
    control(client, "config", duplicate_answer="reject_request")
    with pytest.raises(stripe.InvalidRequestError) as caught:
        send(token_client, ev("b", "3"), ev("dup_7", "2"))
    assert caught.value.code == "duplicate_meter_event"
    assert "dup_7" in str(caught.value)
    assert caught.value.headers is not None
    assert caught.value.headers.get("Stripe-Should-Retry") == "false"
    assert totals(client) == {("api_calls", "cus_a"): "2"}
    assert snapshot(client)["duplicates"] == 1


def test_duplicate_reject_event_and_drop(
    server: EmulatorServer, client: stripe.StripeClient
) -> None:
    make_meter(client)
    token_client = stream(server, client)
    send(token_client, ev("a", "2"))
    control(client, "config", duplicate_answer="reject_event")
    with pytest.raises(stripe.InvalidRequestError):
        send(token_client, ev("b", "3"), ev("a", "2"))
    control(client, "config", duplicate_answer="drop")
    send(token_client, ev("a", "2"), ev("c", "5"))
    assert totals(client) == {("api_calls", "cus_a"): "10"}


def test_drop_control_loses_events_after_a_200(
    server: EmulatorServer, client: stripe.StripeClient
) -> None:
    make_meter(client)
    token_client = stream(server, client)
    assert control(client, "drop", rate=1) == {"drop_rate": 1.0}
    send(token_client, ev("a"), ev("b"))
    state = snapshot(client)
    assert (state["events_dropped"], state["totals"]) == (2, [])


def test_reset_stores_the_events_but_the_client_hears_nothing(
    server: EmulatorServer, client: stripe.StripeClient
) -> None:
    """The hard case of a connection error: the request landed, its answer did not. Only the
    identifier (Stripe's 24-hour dedup) keeps the retry from billing twice."""
    make_meter(client)
    token_client = stream(server, client)
    control(client, "config", reset_rate=1)
    with pytest.raises(stripe.APIConnectionError):
        send(token_client, ev("a", "2"))
    control(client, "config", reset_rate=0)
    send(token_client, ev("a", "2"), ev("b", "1"))  # the retry, plus something new
    assert totals(client) == {("api_calls", "cus_a"): "3"}
    assert snapshot(client)["duplicates"] == 1


# -- meters and summaries ----------------------------------------------------------------


def test_meter_lifecycle(client: stripe.StripeClient) -> None:
    meter_id = make_meter(client)
    other = make_meter(client, "tokens")
    assert client.v1.billing.meters.retrieve(meter_id).event_name == "api_calls"
    listed = client.v1.billing.meters.list({"limit": 1})
    assert [m.id for m in listed.data] == [other] and listed.has_more
    assert [m.id for m in listed.auto_paging_iter()] == [other, meter_id]
    updated = client.v1.billing.meters.update(meter_id, {"display_name": "Calls"})
    assert updated.display_name == "Calls"
    with pytest.raises(stripe.InvalidRequestError):
        renamed: Any = {"event_name": "x"}
        client.v1.billing.meters.update(meter_id, renamed)
    with pytest.raises(stripe.InvalidRequestError):
        make_meter(client, "tokens")
    off = client.v1.billing.meters.deactivate(meter_id)
    assert off.status == "inactive" and off.status_transitions.deactivated_at is not None
    assert [m.id for m in client.v1.billing.meters.list({"status": "inactive"})] == [meter_id]
    assert client.v1.billing.meters.reactivate(meter_id).status == "active"
    with pytest.raises(stripe.InvalidRequestError) as missing:
        client.v1.billing.meters.retrieve("mtr_missing")
    assert missing.value.http_status == 404


def test_event_summaries_hourly(server: EmulatorServer, client: stripe.StripeClient) -> None:
    meter_id = make_meter(client)
    hour = int(time.time()) // 3600 * 3600
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(hour - 1800))
    event = {**ev("old", "7"), "timestamp": stamp}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(hour))
    send(stream(server, client), event, {**ev("now", "2"), "timestamp": now})
    params: Any = {
        "customer": "cus_a",
        "start_time": hour - 3 * 3600,
        "end_time": hour + 3600,
        "value_grouping_window": "hour",
        "limit": 2,
    }
    page = client.v1.billing.meters.event_summaries.list(meter_id, params)
    assert [s.aggregated_value for s in page.data] == [2.0, 7.0]
    assert page.has_more
    every = list(page.auto_paging_iter())
    assert [s.start_time for s in every] == [hour - h * 3600 for h in range(4)]
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing.meters.event_summaries.list(
            meter_id, {"customer": "cus_a", "start_time": hour + 30, "end_time": hour + 3600}
        )


# -- adjustments, reports, the state endpoint --------------------------------------------


def test_adjustments_v1_and_v2(server: EmulatorServer, client: stripe.StripeClient) -> None:
    make_meter(client)
    send(stream(server, client), ev("a", "2"), ev("b", "3"), ev("c", "4"))
    v2 = client.v2.billing.meter_event_adjustments.create(
        {"event_name": "api_calls", "type": "cancel", "cancel": {"identifier": "a"}}
    )
    assert (v2.object, v2.status) == ("v2.billing.meter_event_adjustment", "complete")
    v1 = client.v1.billing.meter_event_adjustments.create(
        {"event_name": "api_calls", "type": "cancel", "cancel": {"identifier": "b"}}
    )
    assert (v1.object, v1.status) == ("billing.meter_event_adjustment", "complete")
    assert totals(client) == {("api_calls", "cus_a"): "4"}
    control(client, "clock", advance_seconds=86401)
    with pytest.raises(stripe.InvalidRequestError) as late:
        client.v2.billing.meter_event_adjustments.create(
            {"event_name": "api_calls", "type": "cancel", "cancel": {"identifier": "c"}}
        )
    assert late.value.code == "invalid_cancel_configuration"


def test_error_report_feed(server: EmulatorServer, client: stripe.StripeClient) -> None:
    make_meter(client)
    send(stream(server, client), ev("good"), ev("bad", "abc"))
    feed = client.v2.core.events.list({"types": ["v1.billing.meter.error_report_triggered"]})
    (event,) = feed.data
    assert event.type == "v1.billing.meter.error_report_triggered"
    raw = client.raw_request("get", "/v2/core/events", created_gt=event.created).data
    assert raw == {"data": [], "next_page_url": None}
    types = event.data["reason"]["error_types"]  # type: ignore[attr-defined]
    assert types[0]["code"] == "meter_event_invalid_value"
    assert types[0]["sample_errors"][0]["request"]["identifier"] == "bad"


def test_state_totals_are_exact(server: EmulatorServer, client: stripe.StripeClient) -> None:
    make_meter(client)
    send(stream(server, client), *[ev(f"t{n}", "0.1") for n in range(10)])
    state = snapshot(client)
    assert state["totals"] == [{"event_name": "api_calls", "customer": "cus_a", "value": "1"}]
    assert state["meters"][0]["formula"] == "sum"
    assert state["events_accepted"] == 10


def test_unknown_path_is_a_v1_404(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.raw_request("get", "/v1/nowhere")
    assert caught.value.http_status == 404


def test_verbose_logs_one_line_per_request(
    client: stripe.StripeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    client.v1.billing.meters.list()
    assert capsys.readouterr().err == ""
    control(client, "config", verbose="true")
    client.v1.billing.meters.list()
    lines = capsys.readouterr().err.splitlines()
    assert any("GET /v1/billing/meters" in line for line in lines)


def test_main_prints_address_and_stops_on_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "consumer.local.emulator", "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        match = re.fullmatch(r"stripe-emulator listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, line
        remote = stripe.StripeClient("sk_test_x", base_addresses={"api": match.group(1)})
        assert remote.v1.billing.meters.list().data == []
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
