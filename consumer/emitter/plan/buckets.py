"""Aggregated buckets and billing-period anchors.

A bucket is `window_seconds` long (one minute by default), so it straddles a billing-period
boundary by less than one bucket. Where `stripe.period_anchor` is configured, buckets are
also cut at every period boundary, so usage after the boundary is never timestamped before
it (the previous invoice). Anchors recur monthly (on the anchor's day, or the month's last
day when shorter, as Stripe's billing cycle does), weekly or daily, at the anchor's time.

Changing the bucketing (window_seconds or the anchors) while pushes of the last 35 days
exist would plan the new buckets against pushes made for the old ones and bill minutes
twice; `mismatched` finds such pushes so the planner refuses instead.
"""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

MINUTE_MS = 60_000
DAY_MS = 86_400_000
_FAR = 253_402_300_799_000  # 9999-12-31: "no anchor after this bucket"


def _ms(d: datetime) -> int:
    return int(d.timestamp() * 1000)


def _month_anchor(anchor: datetime, year: int, month: int) -> datetime:
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def anchors(anchor: datetime | None, period: str, start_ms: int, end_ms: int) -> list[int]:
    """Every period boundary in [start_ms, end_ms], in epoch ms, ascending."""
    if anchor is None:
        return []
    anchor = anchor.astimezone(UTC)
    start = datetime.fromtimestamp(start_ms / 1000, UTC)
    out: list[int] = []
    if period == "month":
        year, month = start.year, start.month - 1
        if month == 0:
            year, month = year - 1, 12
        while True:
            ms = _ms(_month_anchor(anchor, year, month))
            if ms > end_ms:
                return out
            if ms >= start_ms:
                out.append(ms)
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    step = timedelta(days=7 if period == "week" else 1)
    first = anchor + ((start - anchor) // step) * step
    at = first
    while _ms(at) <= end_ms:
        if _ms(at) >= start_ms:
            out.append(_ms(at))
        at += step
    return out


def bucket_sql(column: str) -> tuple[str, str]:
    """ClickHouse expressions for the start and end of the bucket holding `column` (a
    DateTime), given the parameters {sec:UInt32} and {anchors:Array(Int64)} (epoch ms)."""
    step = "INTERVAL {sec:UInt32} SECOND"
    grid = f"toDateTime64(toStartOfInterval({column}, {step}), 3, 'UTC')"
    ms = f"toUnixTimestamp64Milli(toDateTime64({column}, 3, 'UTC'))"
    cuts = "{anchors:Array(Int64)}"
    before = f"arrayMax(arrayConcat([toInt64(0)], arrayFilter(a -> a <= {ms}, {cuts})))"
    after = f"arrayMin(arrayConcat([toInt64({_FAR})], arrayFilter(a -> a > {ms}, {cuts})))"
    start = f"greatest({grid}, fromUnixTimestamp64Milli({before}, 'UTC'))"
    end = f"least({grid} + {step}, fromUnixTimestamp64Milli({after}, 'UTC'))"
    return start, end


def bucket_of(ts_ms: int, window_seconds: int, anchor_ms: Sequence[int]) -> tuple[int, int]:
    """The bucket [start, end) holding `ts_ms`, as bucket_sql computes it."""
    step = window_seconds * 1000
    grid = ts_ms // step * step
    start = max([grid] + [a for a in anchor_ms if a <= ts_ms])
    end = min([grid + step] + [a for a in anchor_ms if a > ts_ms])
    return start, end
