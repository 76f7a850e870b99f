"""Billing-period anchors and the buckets they cut."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.config import StripeConfig
from consumer.emitter.plan.buckets import anchors, bucket_of


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def test_monthly_anchors_fall_back_to_the_last_day_of_short_months() -> None:
    anchor = datetime(2026, 1, 31, 6, 30, tzinfo=UTC)
    got = anchors(anchor, "month", ms("2026-01-15T00:00:00+00:00"), ms("2026-05-01T00:00:00+00:00"))
    assert got == [
        ms("2026-01-31T06:30:00+00:00"),
        ms("2026-02-28T06:30:00+00:00"),
        ms("2026-03-31T06:30:00+00:00"),
        ms("2026-04-30T06:30:00+00:00"),
    ]


def test_weekly_and_daily_anchors_recur_from_the_anchor() -> None:
    anchor = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a Monday noon
    week = anchors(anchor, "week", ms("2026-03-10T00:00:00+00:00"), ms("2026-03-24T00:00:00+00:00"))
    assert week == [ms("2026-03-16T12:00:00+00:00"), ms("2026-03-23T12:00:00+00:00")]
    day = anchors(anchor, "day", ms("2026-02-27T13:00:00+00:00"), ms("2026-03-01T13:00:00+00:00"))
    assert day == [ms("2026-02-28T12:00:00+00:00"), ms("2026-03-01T12:00:00+00:00")]
    assert anchors(None, "month", 0, 10**13) == []


@given(st.integers(0, 10**13), st.sampled_from([60, 300, 3600, 86400]), st.data())
def test_a_bucket_holds_its_time_and_never_crosses_an_anchor(
    ts: int, window: int, data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, 10**13).map(lambda v: v // 60_000 * 60_000))))
    start, end = bucket_of(ts, window, cuts)
    assert start <= ts < end <= start + window * 1000
    assert not any(start < a < end for a in cuts)


def test_an_anchor_must_be_a_whole_minute_with_a_zone() -> None:
    with pytest.raises(ValueError, match="whole minute"):
        StripeConfig(period_anchor=datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC))
    with pytest.raises(ValueError, match="whole minute"):
        StripeConfig(period_anchor=datetime(2026, 1, 1))
    assert StripeConfig(period_anchor=datetime(2026, 1, 1, tzinfo=UTC)).period == "month"
