"""Meter arithmetic: formulas, pre-aggregated windows and event summaries (STRIPE_FACTS §5).

All sums use :mod:`decimal` with a wide context so totals stay exact whatever the inputs.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from decimal import Decimal, localcontext
from typing import Any

from consumer.local.emulator.errors import v1_error
from consumer.local.emulator.events import StoredEvent
from consumer.local.emulator.meters import Meter
from consumer.local.emulator.paging import list_object, paginate

WINDOW_SECONDS = {"hour": 3600, "day": 86400}
_SUMMARY_KEYS = {
    "customer",
    "start_time",
    "end_time",
    "value_grouping_window",
    "limit",
    "starting_after",
    "ending_before",
    "expand",
}


def effective(events: Iterable[StoredEvent], window: str | None) -> list[StoredEvent]:
    """Drop cancelled events; with an event time window keep the latest received per window."""
    live = [e for e in events if not e.cancelled]
    if window is None:
        return live
    size = WINDOW_SECONDS[window]
    latest: dict[tuple[str, int], StoredEvent] = {}
    for event in live:
        key = (event.customer, int(event.timestamp // size))
        if key not in latest or event.order > latest[key].order:
            latest[key] = event
    return list(latest.values())


def aggregate(formula: str, events: list[StoredEvent]) -> Decimal:
    """sum of values, count of events, or the value of the newest event (ties: later received)."""
    if formula == "count":
        return Decimal(len(events))
    if formula == "last":
        if not events:
            return Decimal(0)
        return max(events, key=lambda e: (e.timestamp, e.order)).value
    with localcontext() as context:
        context.prec = 200
        return sum((e.value for e in events), Decimal(0))


def _int_param(params: Mapping[str, object], key: str) -> int:
    raw = params.get(key)
    if raw is None:
        raise v1_error(400, f"Missing required param: {key}.", param=key)
    try:
        return int(str(raw))
    except ValueError:
        raise v1_error(400, f"Invalid integer: {raw}", param=key) from None


def _aligned(value: int, step: int, key: str, what: str) -> None:
    if value % step:
        raise v1_error(400, f"{key} must be aligned to {what} boundaries", param=key)


def _range(params: Mapping[str, object]) -> tuple[int, int, int]:
    """``(start, end, step)`` after the alignment rules; ``step`` spans the whole range when
    no grouping is asked for."""
    start, end = _int_param(params, "start_time"), _int_param(params, "end_time")
    _aligned(start, 60, "start_time", "minute")
    _aligned(end, 60, "end_time", "minute")
    if start >= end:
        raise v1_error(400, "start_time must be before end_time", param="start_time")
    grouping = params.get("value_grouping_window")
    if grouping is None:
        return start, end, end - start
    if not isinstance(grouping, str) or grouping not in WINDOW_SECONDS:
        message = "value_grouping_window must be hour or day"
        raise v1_error(400, message, param="value_grouping_window")
    step = WINDOW_SECONDS[grouping]
    what = "hour" if grouping == "hour" else "UTC day"
    _aligned(start, step, "start_time", what)
    _aligned(end, step, "end_time", what)
    return start, end, step


def summary_id(meter_id: str, customer: str, start: int, end: int) -> str:
    """Stable across calls so cursors keep working."""
    digest = hashlib.sha1(f"{meter_id}|{customer}|{start}|{end}".encode()).hexdigest()
    return f"mtrusg_{digest[:24]}"


def event_summaries(
    meter: Meter, events: Iterable[StoredEvent], params: Mapping[str, object]
) -> dict[str, Any]:
    """GET /v1/billing/meters/{id}/event_summaries for one meter's stored events."""
    for key in params:
        if key not in _SUMMARY_KEYS:
            raise v1_error(400, f"Received unknown parameter: {key}", param=key)
    customer = params.get("customer")
    if not isinstance(customer, str) or not customer:
        raise v1_error(400, "Missing required param: customer.", param="customer")
    start, end, step = _range(params)
    buckets: dict[int, list[StoredEvent]] = defaultdict(list)
    for event in effective((e for e in events if e.customer == customer), meter.event_time_window):
        if start <= event.timestamp < end:
            buckets[int((event.timestamp - start) // step)].append(event)
    items = []
    for index in range((end - start) // step - 1, -1, -1):
        low = start + index * step
        items.append(
            {
                "id": summary_id(meter.id, customer, low, low + step),
                "object": "billing.meter_event_summary",
                "aggregated_value": float(aggregate(meter.formula, buckets.get(index, []))),
                "end_time": low + step,
                "livemode": False,
                "meter": meter.id,
                "start_time": low,
            }
        )
    page, has_more = paginate(items, lambda item: str(item["id"]), params)
    return list_object(f"/v1/billing/meters/{meter.id}/event_summaries", page, has_more)
