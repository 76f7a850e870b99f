"""The emulator's remaining Stripe rules, driven through the official SDK: daily summaries
and their alignment, the timestamp window, string-only payloads, Connect accounts."""

from __future__ import annotations

import time
from typing import Any

import pytest
import stripe

from consumer.local.emulator import EmulatorServer
from tests.integration.test_emulator_sdk import (
    client,
    ev,
    make_meter,
    send,
    server,
    snapshot,
    stream,
    totals,
)

pytestmark = pytest.mark.integration
__all__ = ["client", "server"]  # fixtures shared with test_emulator_sdk
DAY = 86400


def stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def test_daily_summaries_need_utc_midnights(
    server: EmulatorServer, client: stripe.StripeClient
) -> None:
    meter_id = make_meter(client)
    today = int(time.time()) // DAY * DAY
    send(
        stream(server, client),
        {**ev("y", "5"), "timestamp": stamp(today - DAY + 60)},
        {**ev("t", "2"), "timestamp": stamp(today + 30)},
    )
    params: Any = {"customer": "cus_a", "start_time": today - 2 * DAY, "end_time": today + DAY}
    daily: Any = {**params, "value_grouping_window": "day"}
    page = client.v1.billing.meters.event_summaries.list(meter_id, daily)
    assert [(s.start_time, s.aggregated_value) for s in page.auto_paging_iter()] == [
        (today, 2.0),
        (today - DAY, 5.0),
        (today - 2 * DAY, 0.0),
    ]
    whole = client.v1.billing.meters.event_summaries.list(meter_id, params)
    assert [s.aggregated_value for s in whole.data] == [7.0]  # no grouping: one summary
    with pytest.raises(stripe.InvalidRequestError):
        misaligned: Any = {**params, "start_time": today + 3600, "value_grouping_window": "day"}
        client.v1.billing.meters.event_summaries.list(meter_id, misaligned)


def test_timestamps_outside_stripes_window_are_reported_not_billed(
    server: EmulatorServer, client: stripe.StripeClient
) -> None:
    make_meter(client)
    now = time.time()
    send(
        stream(server, client),
        {**ev("old", "3"), "timestamp": stamp(now - 36 * DAY)},
        {**ev("ahead", "4"), "timestamp": stamp(now + 600)},
        {**ev("ok", "5"), "timestamp": stamp(now - 34 * DAY)},
    )
    assert totals(client) == {("api_calls", "cus_a"): "5"}
    feed = client.v2.core.events.list({"types": ["v1.billing.meter.error_report_triggered"]})
    codes = {t["code"] for e in feed.data for t in e.data["reason"]["error_types"]}  # type: ignore[attr-defined]
    assert codes == {"timestamp_too_far_in_past", "timestamp_in_future"}


def test_payload_values_must_be_strings(
    server: EmulatorServer, client: stripe.StripeClient
) -> None:
    make_meter(client)
    with pytest.raises(stripe.InvalidRequestError) as err:
        send(
            stream(server, client), {**ev("n"), "payload": {"stripe_customer_id": "c", "value": 5}}
        )
    assert "payload.value must be a string" in str(err.value)
    assert snapshot(client)["events_accepted"] == 0


def test_a_connected_account_keeps_its_own_meters_and_events(
    server: EmulatorServer, client: stripe.StripeClient
) -> None:
    acme: Any = {"stripe_account": "acct_1Acme"}
    params: Any = {
        "display_name": "calls",
        "event_name": "api_calls",
        "default_aggregation": {"formula": "sum"},
    }
    client.v1.billing.meters.create(params, acme)
    session = client.v2.billing.meter_event_session.create(options=acme)
    token = stripe.StripeClient(
        session.authentication_token, base_addresses={"meter_events": server.url}
    )
    body: Any = {"events": [ev("x", "9")]}
    token.v2.billing.meter_event_stream.create(body, acme)
    assert client.v1.billing.meters.list().data == []  # the platform has none
    assert snapshot(client)["accounts"]["acct_1Acme"]["totals"][0]["value"] == "9"
    with pytest.raises(stripe.InvalidRequestError, match="No such account"):
        client.v1.billing.meters.list(None, {"stripe_account": "cus_not_an_account"})
