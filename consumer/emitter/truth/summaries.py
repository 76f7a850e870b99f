"""Stripe's v1 meters and event summaries: what Stripe actually counted in one minute.

Used only to settle pushes whose outcome is unknown past the identifier memory (see
delivery.py); never on the hot path. Every call waits on the emitter's request-rate limiter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import stripe

from consumer.exact import EXACT, exact_sum


@dataclass(frozen=True)
class Window:
    """A window [start, end) in epoch seconds; `grouped` = a whole hour or day."""

    start: int
    end: int
    grouped: bool


@dataclass(frozen=True)
class StripeMeter:
    id: str
    formula: str
    time_window: str | None


def _options(account: str) -> Any:
    return {"stripe_account": account} if account else None


class SummaryReader:
    def __init__(self, api: stripe.StripeClient, pace: Callable[[], object]) -> None:
        self._api = api
        self._pace = pace
        self._meters: dict[str, dict[str, StripeMeter]] = {}  # account -> event name -> meter

    def meter(self, event_name: str, account: str = "") -> StripeMeter | None:
        """The meter Stripe routes `event_name` to in `account` ("" = the platform; a
        connected account has meters of its own); the list is re-read on a miss."""
        if event_name not in self._meters.get(account, {}):
            self._load(account)
        return self._meters[account].get(event_name)

    def _load(self, account: str) -> None:
        self._pace()
        found: dict[str, StripeMeter] = {}
        listing = self._api.v1.billing.meters.list({"limit": 100}, _options(account))
        for m in listing.auto_paging_iter():
            meter = StripeMeter(m.id, m.default_aggregation.formula, m.event_time_window)
            if m.status == "active" or m.event_name not in found:
                found[m.event_name] = meter
        self._meters[account] = found

    def minute_total(
        self, meter: StripeMeter, customer: str, minute_ms: int, account: str = ""
    ) -> Decimal:
        """The aggregated value of [minute, minute + 60 s) for one customer."""
        self._pace()
        start = minute_ms // 1000
        page = self._api.v1.billing.meters.event_summaries.list(
            meter.id,
            {"customer": customer, "start_time": start, "end_time": start + 60},
            _options(account),
        )
        return exact_sum(Decimal(repr(float(s.aggregated_value))) for s in page.data)

    def window_totals(
        self, meter: StripeMeter, customer: str, cuts: Sequence[Window], grouping: str, account: str
    ) -> dict[int, Decimal]:
        """Stripe's aggregated value per window (start in epoch seconds): whole hours or days
        in one grouped, paginated read; a partial window on its own."""
        out: dict[int, Decimal] = {}
        whole = [w for w in cuts if w.grouped]
        reads: list[tuple[int, int, str | None]] = [
            (w.start, w.end, None) for w in cuts if not w.grouped
        ]
        if whole:
            reads.append((whole[0].start, whole[-1].end, grouping))
        for start, end, group in reads:
            self._pace()
            params: Any = {"customer": customer, "start_time": start, "end_time": end}
            if group:
                params["value_grouping_window"] = group
            page = self._api.v1.billing.meters.event_summaries.list(
                meter.id, params, _options(account)
            )
            for s in page.auto_paging_iter():
                value = Decimal(repr(float(s.aggregated_value)))
                out[int(s.start_time)] = EXACT.add(out.get(int(s.start_time), Decimal(0)), value)
        return out
