"""Reconciliation: what Stripe's event summaries hold against what the outbox delivered.

A 2xx is not billing (Stripe validates asynchronously and can lose an event after
answering), so the proof is a comparison per customer, meter and window: Stripe's summary
minus the amounts of the pushes marked sent there is the drift. Windows are hours (or days)
between minute-aligned bounds; a partial first or last window is read on its own, and the
trailing minutes that may still be settling into Stripe's summaries are left out. Usage
that is not billed yet, or held for a person (rejected, expired), is shown beside the drift,
never counted as drift; so is cancelled usage Stripe still bills because it was cancelled
too late to take back (late corrections, consumer/emitter/truth/corrections.py). Pushes that
`reconcile --repair` made (mode `repair`, ops/repair.py) replace what Stripe lost of the
pushes counted here, so they are shown apart and never added to what was delivered: once
one lands, the window's drift is zero.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from consumer.config import MeterConfig
from consumer.emitter.truth.summaries import SummaryReader
from consumer.emitter.truth.summaries import Window as Piece
from consumer.exact import EXACT
from consumer.metrics import Metrics
from consumer.ops.times import parse_instant
from consumer.ops.totals import format_table
from consumer.store.backend import Backend

MINUTE = 60
SPAN = {"hour": 3600, "day": 86400}
_RELATIVE = Decimal("1e-12")  # summaries are floats: closer than this is no drift
_ABSOLUTE = Decimal("1e-9")


class ReconcileError(ValueError):
    """Arguments that cannot be reconciled (bounds, window); phrased for the command line."""


def pieces(start: int, end: int, window: str) -> list[Piece]:
    """[start, end) cut into whole windows, with partial ones at either edge."""
    if window not in SPAN:
        raise ReconcileError(f"--window must be one of {', '.join(SPAN)}")
    if start % MINUTE or end % MINUTE:
        raise ReconcileError("--from and --to must be whole minutes (Stripe's summaries are)")
    if end <= start:
        raise ReconcileError("--to must be after --from (after leaving out settling minutes)")
    span = SPAN[window]
    first, last = -(-start // span) * span, end // span * span
    if first >= last:
        return [Piece(start, end, False)]
    out = [Piece(start, first, False)] if start < first else []
    out += [Piece(t, t + span, True) for t in range(first, last, span)]
    return out + ([Piece(last, end, False)] if last < end else [])


@dataclass
class Line:
    """One (customer, meter, window): usage, what the outbox delivered, what Stripe holds."""

    customer: str
    meter: str
    start: int
    end: int
    usage: Decimal = Decimal(0)
    delivered: Decimal = Decimal(0)
    unbilled: Decimal = Decimal(0)
    late: Decimal = Decimal(0)  # cancelled usage Stripe still bills
    repaired: Decimal = Decimal(0)  # repair pushes delivered or on their way (ops/repair.py)
    stripe: Decimal = Decimal(0)
    account: str = ""
    _last_at: tuple[int, int] = (-1, -1)

    @property
    def drift(self) -> Decimal:
        d = EXACT.subtract(self.stripe, self.delivered)
        scale = max(abs(self.stripe), abs(self.delivered))
        return Decimal(0) if abs(d) <= max(scale * _RELATIVE, _ABSOLUTE) else d


@dataclass
class Report:
    lines: list[Line] = field(default_factory=list)
    settling_from: int = 0

    @property
    def drifting(self) -> list[Line]:
        return [x for x in self.lines if x.drift != 0]

    @property
    def corrected_late(self) -> list[Line]:
        return [x for x in self.lines if x.late != 0]

    def total_drift(self) -> Decimal:
        return sum((abs(x.drift) for x in self.lines), Decimal(0))

    def within(self, tolerance: Decimal) -> bool:
        return all(abs(x.drift) <= tolerance for x in self.lines)


def _formula(m: MeterConfig) -> str:
    return "last" if m.aggregation == "last" else "sum"


def piece_at(cuts: Sequence[Piece], starts: Sequence[int], ts: int) -> Piece:
    """The piece holding `ts` (`starts` ascending, one per piece): a binary search, since a
    reconcile over 35 days of minute windows meets every row once."""
    i = bisect.bisect_right(starts, ts) - 1
    if i < 0:
        raise ValueError(f"{ts} is before the first piece ({starts[0]})")
    return cuts[i]


def _collect(
    store: Backend, meter: MeterConfig, cuts: Sequence[Piece], customer: str | None
) -> dict[tuple[str, int], Line]:
    """The ClickHouse side of one meter, per (customer, piece)."""
    lo, hi = cuts[0].start, cuts[-1].end
    starts = [p.start for p in cuts]

    lines: dict[tuple[str, int], Line] = {}

    def line(c: str, ts: int) -> Line:
        p = piece_at(cuts, starts, ts)
        return lines.setdefault((c, p.start), Line(c, meter.name, p.start, p.end))

    params = {"m": meter.name, "lo": lo, "hi": hi, "c": customer or ""}
    pushes = store.query(
        """SELECT customer_id, stripe_account, toUnixTimestamp64Milli(stripe_timestamp),
                  status_rank IN (2, 6), toString(ifNull(sent_value, value)), toString(value),
                  toUnixTimestamp64Milli(first_attempt_at), mode = 'repair',
                  status_rank IN (4, 7)
           FROM stripe_pushes FINAL
           WHERE meter = {m:String} AND ({c:String} = '' OR customer_id = {c:String})
             AND status_rank != 8
             AND stripe_timestamp >= toDateTime64({lo:Int64}, 3, 'UTC')
             AND stripe_timestamp < toDateTime64({hi:Int64}, 3, 'UTC')""",
        params,
    )
    last = _formula(meter) == "last"
    for c, account, ts_ms, delivered, billed, value, sent_ms, repair, held in pushes:
        x = line(str(c), int(ts_ms) // 1000)
        x.account = x.account or str(account)
        if repair:  # in place of what Stripe lost: never part of what was delivered
            if not held:
                x.repaired = EXACT.add(x.repaired, Decimal(billed if delivered else value))
            continue
        # Stripe's last value: the newest timestamp (ms), ties to the later received
        newest = (int(ts_ms), int(sent_ms))
        if not delivered:
            x.unbilled = EXACT.add(x.unbilled, Decimal(value))
        elif last and newest >= x._last_at:
            x.delivered, x._last_at = Decimal(billed), newest
        elif not last:
            x.delivered = EXACT.add(x.delivered, Decimal(billed))
    usage = store.query(
        """SELECT customer_id, toUnixTimestamp(window_start), toString(sum_value), event_count,
                  toString(last_value), toUnixTimestamp64Milli(last_time)
           FROM usage_windows FINAL
           WHERE meter = {m:String} AND ({c:String} = '' OR customer_id = {c:String})
             AND window_start >= toDateTime({lo:Int64}, 'UTC')
             AND window_start < toDateTime({hi:Int64}, 'UTC')""",
        params,
    )
    late = store.query(
        """SELECT customer_id, toUnixTimestamp(bucket_start), toString(value)
           FROM stripe_corrections FINAL
           WHERE meter = {m:String} AND ({c:String} = '' OR customer_id = {c:String})
             AND outcome = 'late'
             AND bucket_start >= toDateTime64({lo:Int64}, 3, 'UTC')
             AND bucket_start < toDateTime64({hi:Int64}, 3, 'UTC')""",
        params,
    )
    for c, ts, value in late:
        x = line(str(c), int(ts))
        x.late = EXACT.add(x.late, Decimal(value))
    at: dict[tuple[str, int], int] = defaultdict(lambda: -1)
    for c, ts, s, n, lv, lt in usage:
        x = line(str(c), int(ts))
        key = (x.customer, x.start)
        if meter.aggregation == "last" and int(lt) >= at[key]:
            x.usage, at[key] = Decimal(lv), int(lt)
        elif meter.aggregation == "count":
            x.usage += int(n)
        elif meter.aggregation != "last":
            x.usage = EXACT.add(x.usage, Decimal(s))
    return lines


def reconcile(
    store: Backend,
    summaries: SummaryReader,
    meters: Sequence[MeterConfig],
    start: int,
    end: int,
    *,
    window: str = "hour",
    customer: str | None = None,
    metrics: Metrics | None = None,
) -> Report:
    """Compare [start, end) (epoch seconds, whole minutes) per customer, meter and window."""
    cuts = pieces(start, end, window)
    report = Report(settling_from=end)
    for meter in meters:
        if not meter.stripe_event_name:
            continue
        lines = _collect(store, meter, cuts, customer)
        for c in sorted({k[0] for k in lines}):
            mine = [x for (cc, _), x in lines.items() if cc == c]
            account = next((x.account for x in mine if x.account), "")
            found = summaries.meter(meter.stripe_event_name, account)
            held = summaries.window_totals(found, c, cuts, window, account) if found else {}
            for p in cuts:
                x = lines.get((c, p.start))
                if x is None and held.get(p.start, Decimal(0)) == 0:
                    continue
                x = x or lines.setdefault((c, p.start), Line(c, meter.name, p.start, p.end))
                x.stripe = held.get(p.start, Decimal(0))
        report.lines += sorted(lines.values(), key=lambda x: (x.customer, x.meter, x.start))
    if metrics is not None:
        for m in meters:
            if m.stripe_event_name:
                drift = sum((abs(x.drift) for x in report.lines if x.meter == m.name), Decimal(0))
                metrics.reconcile_drift.labels(m.name).set(float(drift))
                metrics.reconcile_windows.labels(m.name).set(
                    sum(1 for x in report.drifting if x.meter == m.name)
                )
    return report


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _num(v: Decimal) -> str:
    return format(v.normalize(), "f") if v else "0"


def format_report(report: Report, show_all: bool = False) -> str:
    """The drift table (every window with `show_all`) and the one-line verdict."""
    shown = report.lines if show_all else [x for x in report.lines if x.drift or x.late]
    header = [
        "customer", "meter", "window", "usage", "billed", "stripe", "drift", "not billed",
        "late corrections", "repaired",
    ]  # fmt: skip
    rows = [
        [
            x.customer,
            x.meter,
            f"{_iso(x.start)}/{x.end - x.start}s",
            _num(x.usage),
            _num(x.delivered),
            _num(x.stripe),
            _num(x.drift),
            _num(x.unbilled),
            _num(x.late),
            _num(x.repaired),
        ]
        for x in shown
    ]
    customers = len({x.customer for x in report.lines})
    verdict = (
        f"reconcile: drift={_num(report.total_drift())} windows={len(report.drifting)}"
        f"/{len(report.lines)} customers={customers} "
        f"not_billed={_num(sum((x.unbilled for x in report.lines), Decimal(0)))} "
        f"late_corrections={_num(sum((x.late for x in report.lines), Decimal(0)))} "
        f"settling_after={_iso(report.settling_from)}"
    )
    return (format_table(header, rows) + "\n" if rows else "") + verdict


def parse_time(text: str) -> int:
    """RFC 3339 or epoch seconds, as epoch seconds."""
    try:
        return int(parse_instant(text))
    except ValueError as exc:
        raise ReconcileError(str(exc)) from None
