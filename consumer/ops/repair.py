"""`reconcile --repair`: what Stripe lost is queued in the outbox again, what it holds too
much of is reported for a person.

A window drifts negative when Stripe's event summary holds less than the pushes the outbox
marked delivered there: Stripe answered 200 and lost events. The repair writes new pushes
(mode `repair`) carrying what is missing, with identifiers of their own (a lost push's
identifier would be dropped by Stripe's 24-hour dedup), timestamped inside the window (at
the newest delivered push's time, or the oldest minute Stripe still accepts). They are
never sent from here: the emitter that holds the lease sends them as any pending push,
fenced before every request, with first attempts, marks and checks; this command makes no
Stripe write and needs no lease. A repair push is shown apart by `reconcile` and never
counts as delivered usage, so once it lands the window's drift is zero.

Idempotent and crash-safe by reading before writing: the missing amount is the drift less
every repair of the window still on its way (pending, attempted) or delivered so recently
that Stripe's summary may not show it yet (within the settle time); all of a run's pushes
go in one insert, named in `stripe_open` first (outbox.py). A kill before that insert
leaves nothing; after it, the re-run finds the pushes and adds none. The n-th repair of a
window has a deterministic identifier, so two runs that agree write one push.

Not repaired, reported with the reason instead:
- positive drift (Stripe holds more): every push of ours is counted once in what was
  delivered, so the surplus is not an identifier the outbox can cancel. Past Stripe's 24
  hours a cancel is impossible anyway; inside them the report names our repair pushes of
  the window that a lagging summary may have made surplus, for a person to cancel;
- a window holding pushes marked delivered within the settle time (the summary may lag);
- a window whose repair was rejected or expired (see stripe_delivery);
- a window entirely older than Stripe's 35-day timestamp limit;
- a `last` meter window already repaired once whose drift stayed (another writer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_FLOOR, Decimal

from consumer import crash_points
from consumer.config import MeterConfig
from consumer.emitter.plan import outbox
from consumer.emitter.plan.identifiers import repair_identifier
from consumer.emitter.plan.outbox import AWAITING, CANCELLED, DELIVERED, HELD, PENDING, Push
from consumer.emitter.plan.units import billed
from consumer.emitter.truth.delivery import HOUR_MS, MINUTE_MS
from consumer.exact import EXACT
from consumer.ops.reconcile import Line, Report
from consumer.ops.totals import format_table
from consumer.store.backend import Backend

CANCEL_WITHIN_MS = 23 * HOUR_MS  # as corrections.py: Stripe cancels within 24 h of receipt

SEND, IN_FLIGHT, COVERED, SETTLING, WAITING, PERSON = (
    "queued", "in flight", "nothing to send", "settling", "waiting", "for a person",
)  # fmt: skip


@dataclass
class Action:
    """What the repair does about one drifting window."""

    line: Line
    kind: str
    amount: Decimal
    reason: str
    pushes: list[Push] = field(default_factory=list)


@dataclass(frozen=True)
class Limits:
    """`now_ms`: this run's clock; `settle_ms`: how long a delivery may take to show in
    Stripe's summaries; `oldest_ms`: the oldest timestamp Stripe still accepts."""

    now_ms: int
    settle_ms: int
    oldest_ms: int


def plan(
    store: Backend, report: Report, meters: Sequence[MeterConfig], limits: Limits
) -> list[Action]:
    """An action for every drifting window of `report`, from the outbox's pushes there."""
    by_name = {m.name: m for m in meters}
    actions: list[Action] = []
    for name in sorted({x.meter for x in report.drifting}):
        lines = [x for x in report.drifting if x.meter == name]
        pushes = _pushes(store, name, lines)
        for x in lines:
            mine = [p for p in pushes if p.customer_id == x.customer and _in(p, x)]
            late = x.late
            if late and by_name[name].emission == "aggregated":
                late = _late_now(store, x, mine)
            actions.append(decide(by_name[name], x, mine, late, limits))
    return actions


def _late_now(store: Backend, x: Line, pushes: list[Push]) -> Decimal:
    """What of window `x`'s late corrections still stands. An aggregated bucket's late
    record keeps the excess it found, also once usage grew back into it (the planner nets
    later usage against it): what stands is at most the bucket's pushes (cancelled ones
    aside) less its total now. Stripe may have lost the pushes a late record counts: past
    its 24 hours no cancel asks."""
    rows = store.query(
        """SELECT toUnixTimestamp64Milli(bucket_start), toString(value)
           FROM stripe_corrections FINAL
           WHERE mode = 'aggregated' AND meter = {m:String} AND customer_id = {c:String}
             AND outcome = 'late'
             AND bucket_start >= toDateTime64({lo:Int64}, 3, 'UTC')
             AND bucket_start < toDateTime64({hi:Int64}, 3, 'UTC')""",
        {"m": x.meter, "c": x.customer, "lo": x.start, "hi": x.end},
    )
    windows = store.query(
        """SELECT toUnixTimestamp(window_start) * 1000, toString(sum_value)
           FROM usage_windows FINAL
           WHERE meter = {m:String} AND customer_id = {c:String}
             AND window_start >= toDateTime({lo:Int64}, 'UTC')
             AND window_start < toDateTime({hi:Int64}, 'UTC')""",
        {"m": x.meter, "c": x.customer, "lo": x.start, "hi": x.end + 3600},
    )
    late = Decimal(0)
    for bucket, value in rows:
        b = int(bucket)
        mine = [p for p in pushes if p.mode == "aggregated" and p.bucket_ms == b]
        end = max((p.bucket_end_ms for p in mine), default=b + MINUTE_MS)
        pushed = sum((p.value for p in mine if p.status != CANCELLED), Decimal(0))
        total = sum((Decimal(v) for w, v in windows if b <= int(w) < end), Decimal(0))
        late += min(Decimal(value), max(Decimal(0), pushed - total))
    return late


def apply(store: Backend, actions: Sequence[Action], now_ms: int) -> int:
    """Write every queued push in one insert (named in stripe_open first); returns how
    many. The emitter holding the lease sends them."""
    pushes = [p for a in actions for p in a.pushes]
    crash_points.reached("before_repair_pushes")
    outbox.write(store, pushes, PENDING, now_ms)
    crash_points.reached("after_repair_pushes")
    return len(pushes)


def _in(p: Push, x: Line) -> bool:
    return x.start * 1000 <= p.timestamp_ms < x.end * 1000


def _pushes(store: Backend, meter: str, lines: Sequence[Line]) -> list[Push]:
    """Every push of `meter` in the drifting windows' customers and span, in any status."""
    rows = store.query(
        f"""SELECT {outbox.COLUMNS} FROM stripe_pushes FINAL
           WHERE meter = {{m:String}} AND customer_id IN {{c:Array(String)}}
             AND stripe_timestamp >= toDateTime64({{lo:Int64}}, 3, 'UTC')
             AND stripe_timestamp < toDateTime64({{hi:Int64}}, 3, 'UTC')""",
        {
            "m": meter,
            "c": sorted({x.customer for x in lines}),
            "lo": min(x.start for x in lines),
            "hi": max(x.end for x in lines),
        },
    )
    return [outbox.from_row(r) for r in rows]


def decide(
    meter: MeterConfig, x: Line, pushes: list[Push], late: Decimal, limits: Limits
) -> Action:
    """What to do about drifting window `x`, from every push of the window (`late`: what of
    its late corrections still stands). No reads: the whole decision, for tests."""
    originals = [p for p in pushes if p.mode != "repair" and p.status != CANCELLED]
    repairs = [p for p in pushes if p.mode == "repair"]
    live = [p for p in repairs if p.status != CANCELLED]
    delivered = [p for p in originals if p.status in DELIVERED]
    fresh = limits.now_ms - limits.settle_ms
    if any(p.updated_ms > fresh for p in delivered):
        why = "pushes were marked delivered here within the settle time: run again later"
        return Action(x, SETTLING, Decimal(0), why)
    held = [p for p in live if p.status in HELD]
    if held:
        why = f"repair {held[0].identifier} is held ({held[0].reason}): see stripe_delivery"
        return Action(x, PERSON, Decimal(0), why)
    going = [p for p in live if p.status in AWAITING or (p.updated_ms > fresh)]
    in_flight = sum((billed(p) if p.sent is not None else p.value for p in going), Decimal(0))
    if meter.formula == "last":
        return _last(meter, x, delivered, live, going, len(repairs), limits)
    if x.drift > 0:
        return _surplus(x, originals, live, limits)
    # Cancelled usage recorded as still billed (a late correction) is never sent again: if
    # Stripe lost it, it lost usage that was taken back. Its cancel came past Stripe's 24
    # hours, so none was tried and nothing told the corrections of the loss (a cancel within
    # them finds it: outcome `absent`, the push marked cancelled, no drift left here).
    short = EXACT.subtract(EXACT.subtract(x.delivered, late), x.stripe)
    if short <= 0:
        why = "all of it is cancelled usage (late corrections): nothing to send"
        return Action(x, COVERED, Decimal(0), why)
    missing = short - in_flight
    if missing <= 0:
        return Action(x, IN_FLIGHT, in_flight, "repair pushes on their way cover it")
    at = _timestamp(x, delivered, limits)
    if at is None:
        return Action(x, PERSON, missing, "the window is past Stripe's 35-day timestamp limit")
    if meter.stripe_value_format == "whole" or meter.formula == "count":
        missing = missing.to_integral_value(ROUND_FLOOR)
        if missing <= 0:
            return Action(x, COVERED, Decimal(0), "less than one whole unit is missing")
    amounts = [Decimal(1)] * int(missing) if meter.formula == "count" else [missing]
    queued = [
        _push(meter, x, at, len(repairs) + i, amount, short) for i, amount in enumerate(amounts)
    ]
    why = f"Stripe lacks {_num(short)}" + (
        f"; {_num(in_flight)} already on its way" * bool(in_flight)
    )
    return Action(x, SEND, missing, why, queued)


def _last(
    meter: MeterConfig,
    x: Line,
    delivered: list[Push],
    live: list[Push],
    going: list[Push],
    n: int,
    limits: Limits,
) -> Action:
    """A `last` meter bills the newest value: the delivered one is sent again at the newest
    delivered timestamp (received later, it wins the tie), which can never bill twice."""
    if going:
        return Action(x, IN_FLIGHT, x.delivered, "a repair push is on its way")
    if live:
        why = f"repaired before ({live[-1].identifier}) and Stripe still differs: another writer?"
        return Action(x, PERSON, x.drift, why)
    if not delivered:
        return Action(x, PERSON, x.drift, "Stripe holds a value the outbox never delivered")
    newest = max(delivered, key=lambda p: (p.timestamp_ms, p.first_attempt_ms))
    if newest.timestamp_ms < limits.oldest_ms:
        return Action(x, PERSON, x.drift, "the window is past Stripe's 35-day timestamp limit")
    push = _push(meter, x, newest.timestamp_ms, n, x.delivered, x.delivered)
    return Action(x, SEND, x.delivered, f"Stripe's last value is {_num(x.stripe)}", [push])


def _surplus(x: Line, originals: list[Push], repairs: list[Push], limits: Limits) -> Action:
    """Stripe holds more than was delivered: never sent anything, reported with why."""
    if any(p.attempted for p in originals):
        why = "pushes with an unknown outcome may account for it: the emitter checks them"
        return Action(x, WAITING, x.drift, why)
    recent = [p for p in repairs if p.first_attempt_ms > limits.now_ms - CANCEL_WITHIN_MS]
    if recent:
        ids = ", ".join(p.identifier for p in recent)
        why = (
            f"our repair pushes {ids} may be surplus (a lagging summary): cancel them "
            "within 24 h of their first send, or credit the customer"
        )
    elif not any(p.status in DELIVERED for p in originals):
        why = (
            "the outbox delivered nothing here: another writer of this meter; cancel its "
            "events within 24 h of their receipt, or credit the customer"
        )
    elif any(p.first_attempt_ms > limits.now_ms - CANCEL_WITHIN_MS for p in originals):
        why = (
            "not an identifier of ours (each push is counted once): inside Stripe's 24 h "
            "cancellation window, find the other writer of this meter and cancel its events"
        )
    else:
        why = "past Stripe's 24 h cancellation window: credit the customer"
    return Action(x, PERSON, x.drift, why)


def _timestamp(x: Line, delivered: list[Push], limits: Limits) -> int | None:
    """Where a repair of `x` is timestamped: its newest delivered push's time, else the
    window's start; moved up to the oldest whole minute Stripe accepts; None past the
    window's end."""
    at = max((p.timestamp_ms for p in delivered), default=x.start * 1000)
    if at < limits.oldest_ms:
        at = -(-limits.oldest_ms // MINUTE_MS) * MINUTE_MS
    return at if at < x.end * 1000 else None


def _push(meter: MeterConfig, x: Line, at_ms: int, n: int, amount: Decimal, lost: Decimal) -> Push:
    """The n-th repair push of window `x`: its amount fixed now (`sent`), so the emitter's
    whole-number carry is neither used nor moved by it."""
    return Push(
        repair_identifier(meter.name, x.customer, x.start, n),
        "repair",
        meter.name,
        meter.stripe_event_name or "",
        x.customer,
        at_ms,
        n,
        amount,
        0,
        PENDING,
        reason=f"repair: Stripe lacked {_num(lost)} in {_iso(x.start)}/{x.end - x.start}s",
        sent=amount,
        account=x.account,
    )


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _num(v: Decimal) -> str:
    return format(v.normalize(), "f") if v else "0"


def format_actions(actions: Sequence[Action]) -> str:
    """One row per drifting window, and the verdict line."""
    header = ["customer", "meter", "window", "drift", "repair", "amount", "why"]
    rows = [
        [
            a.line.customer,
            a.line.meter,
            f"{_iso(a.line.start)}/{a.line.end - a.line.start}s",
            _num(a.line.drift),
            a.kind,
            _num(a.amount),
            a.reason,
        ]
        for a in actions
    ]
    kinds = (SEND, IN_FLIGHT, COVERED, SETTLING, WAITING, PERSON)
    count = {k: sum(a.kind == k for a in actions) for k in kinds}
    units = sum((a.amount for a in actions if a.kind == SEND), Decimal(0))
    verdict = (
        f"repair: queued={count[SEND]} units={_num(units)} pushes="
        f"{sum(len(a.pushes) for a in actions)} in_flight={count[IN_FLIGHT]} "
        f"nothing_to_send={count[COVERED]} "
        f"settling={count[SETTLING]} waiting={count[WAITING]} for_a_person={count[PERSON]}"
    )
    return (format_table(header, rows) + "\n" if rows else "") + verdict


def repair(
    store: Backend,
    report: Report,
    meters: Sequence[MeterConfig],
    limits: Limits,
) -> tuple[list[Action], int]:
    """Plan and write the repairs of `report`'s drifting windows; the actions and how many
    pushes were queued."""
    actions = plan(store, report, meters, limits)
    return actions, apply(store, actions, limits.now_ms)
