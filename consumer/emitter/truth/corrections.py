"""Corrections: cancelled usage taken back from Stripe, or recorded where it cannot be.

The sink already took a cancelled event out of ClickHouse's windows; here its pushes follow.
Stripe cancels a meter event by identifier only within 24 hours of receiving it, and a push
was received after its first attempt, so a push first attempted less than 23 hours ago is
safely inside that limit.

Per-event meters: a cancellation names one push.
  never sent, rejected or expired        -> CANCELLED without a request           (unsent)
  sent with nothing whole (no request)   -> CANCELLED                             (unsent)
  sent, first attempt within 23 hours    -> one adjustment per event, CANCELLED   (adjusted)
    ... and Stripe has no such event     -> CANCELLED: Stripe lost it after its 200, so
                                            never billed it                       (absent)
  sent earlier, or Stripe refuses        -> recorded: Stripe still bills it        (late)
  attempted with the outcome unknown     -> waits until it settles
Aggregated meters: a bucket whose total fell below what was pushed for it.
  every sent revision within 23 hours    -> each adjusted, all CANCELLED; the planner then
                                            pushes the bucket's total afresh      (adjusted)
    ... Stripe has no event for some     -> those CANCELLED as well, every other revision
                                            still adjusted                        (absent)
    ... Stripe refuses one otherwise     -> the others CANCELLED; what the refused ones
                                            bill beyond the usage is recorded     (late)
  a sent revision older                  -> revisions never sent are CANCELLED; what
                                            Stripe still bills beyond the usage is recorded,
                                            later usage in the bucket nets against it (the
                                            planner plans only growth)            (late)
  only rejected or expired revisions     -> recorded; nothing is billed           (held)
Rejected and expired revisions stay as they are: their usage is held for a person.

Stripe answers "no such event" for an identifier it does not hold: it answered 200 and lost
the event (reconcile's negative drift), so the cancel has nothing to take back, and the push
is marked CANCELLED like an adjusted one (reason `cancelled (absent at Stripe)`); the
bucket's total then goes afresh under a new identifier, which replaces what was lost.

Order: the decision to adjust is recorded first (outcome `adjusting`, naming the pushes),
then the adjustments (all of them, whatever Stripe answers for one), the CANCELLED marks in
one write, and the final record. A decision is taken once: a crash anywhere after it is
finished by the next cycle of any process, which repeats the adjustments (cancelling a
cancelled event is accepted, one Stripe lacks is lacked again) and the marks whatever its
own clock reads. Deciding afresh would not do: a process whose clock jumped a day would find
too late to cancel what Stripe already had cancelled, and record it as still billed. Nothing
is billed twice and no correction is lost. A record replacing another gets a later version
than it even if this clock is behind the writer's (`_write`). Late corrections are counted
(`usage_consumer_stripe_corrections_total{outcome="late"}`), logged, and listed by
`reconcile`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal

import pyarrow as pa

from consumer import crash_points
from consumer.config import MeterConfig
from consumer.emitter.plan import outbox, queue
from consumer.emitter.plan.buckets import anchors
from consumer.emitter.plan.identifiers import per_event_identifier
from consumer.emitter.plan.outbox import CANCELLED, DELIVERED, EXPIRED, REJECTED, Push
from consumer.emitter.plan.units import billed
from consumer.emitter.send.sender import CannotCancel, NoSuchEvent, Sender
from consumer.emitter.truth.delivery import DAY_MS, HOUR_MS
from consumer.metrics import Metrics
from consumer.records import DECIMAL, TIME_MS
from consumer.store.backend import Backend

log = logging.getLogger("consumer.emitter.loop")  # the emitter's alerts share one logger
CANCEL_WITHIN_MS = 23 * HOUR_MS
PER_CYCLE = 200
LATE_WHY = "first sent over 23 hours ago: Stripe cancels only within 24 hours of receipt"
RETRY_WHY = (
    " (a retry: an interrupted earlier attempt may have cancelled it; check the event's"
    " usage in Stripe before crediting)"
)
ADJUSTING = "adjusting"  # the decision to adjust, recorded before the first request
ABSENT = "absent"  # Stripe had no event to cancel: it never billed the push
ABSENT_MARK = "cancelled (absent at Stripe)"  # such a push's reason, once marked


@dataclass
class Record:
    """One row of stripe_corrections: what a cancellation came to."""

    meter: str
    customer_id: str
    bucket_ms: int
    cancelled_id: str  # "" for an aggregated bucket
    mode: str
    outcome: str  # adjusted | unsent | absent | late | held
    value: Decimal
    identifiers: list[str] = field(default_factory=list)
    reason: str = ""


@dataclass
class _Decision:
    """What to do about the pushes of one cancellation or bucket."""

    cancel: list[Push] = field(default_factory=list)  # to mark CANCELLED
    adjust: list[Push] = field(default_factory=list)  # to cancel at Stripe first
    late: list[Push] = field(default_factory=list)  # Stripe keeps billing these
    waiting: bool = False  # an outcome is unknown: decide later


def _decide(pushes: Sequence[Push], now_ms: int, begun: bool) -> _Decision:
    """`begun`: an earlier cycle decided to adjust these pushes; it is finished, never
    judged again against this process's clock."""
    d = _Decision()
    for p in pushes:
        if p.status == CANCELLED or p.status in (REJECTED, EXPIRED):
            continue
        if p.attempted:
            d.waiting = True
        elif p.status not in DELIVERED or billed(p) == 0:
            d.cancel.append(p)  # never sent, or nothing whole was (no request was made)
        elif begun or now_ms - p.first_attempt_ms < CANCEL_WITHIN_MS:
            d.adjust.append(p)
        else:
            d.late.append(p)
    return d


class Corrector:
    """Runs once per emitter cycle, before anything is sent."""

    def __init__(
        self,
        store: Backend,
        sender: Sender,
        meters: Sequence[MeterConfig],
        metrics: Metrics,
        anchor: datetime | None = None,
        period: str = "month",
        lookback_days: int = 35,
    ) -> None:
        self._store = store
        self._sender = sender
        self._metrics = metrics
        billed_meters = [m for m in meters if m.stripe_event_name]
        self._per_event = {m.name: m for m in billed_meters if m.emission == "per_event"}
        self._aggregated = [m for m in billed_meters if m.emission == "aggregated"]
        self._anchor, self._period = anchor, period
        self._lookback_ms = lookback_days * DAY_MS
        self._bucketing_checked: set[str] = set()  # checked once a process (outbox.py)
        self._overbilled: dict[str, Decimal] | None = None  # late totals per meter, once read

    def run(self, now_ms: int, taken: queue.Taken) -> int:
        """Take back what was cancelled since the last cycle; returns how much was done.
        Buckets and per-event customers are looked at when `taken` names them (queue.py)."""
        if self._overbilled is None:
            self._report_late([], {})  # the gauge, from the first cycle of a lease
        done = self._resume(now_ms)
        done += self._per_event_cancellations(now_ms, taken)
        for meter in self._aggregated:
            done += self._shrunk_buckets(meter, now_ms, taken)
        return done

    def _resume(self, now_ms: int) -> int:
        """Finish the adjustments an earlier cycle decided on and did not record as done
        (a crash, or an outcome that was still unknown)."""
        # Keys first, unmerged rows only (merges drop a finished decision's row), so a
        # cycle never reads the whole table FINAL.
        rows = self._store.query(
            """SELECT meter, customer_id, toUnixTimestamp64Milli(bucket_start), cancelled_id,
                      mode, toString(value), identifiers
               FROM stripe_corrections FINAL
               WHERE (meter, customer_id, bucket_start, cancelled_id) IN (
                        SELECT meter, customer_id, bucket_start, cancelled_id
                        FROM stripe_corrections WHERE outcome = 'adjusting')
                 AND outcome = 'adjusting'
               ORDER BY meter, customer_id, bucket_start, cancelled_id LIMIT {n:UInt32}""",
            {"n": PER_CYCLE},
        )
        begun = [
            Record(str(m), str(c), int(b), str(i), str(mode), ADJUSTING, Decimal(v), list(ids))
            for m, c, b, i, mode, v, ids in rows
        ]
        pushes = {
            p.identifier: p
            for p in outbox.by_identifier(
                self._store, sorted({i for r in begun for i in r.identifiers})
            )
        }
        records: list[Record] = []
        for record in begun:
            mine = [pushes[i] for i in record.identifiers if i in pushes]
            settled = self._settle(mine, now_ms, record, begun=True)
            if settled is not None:
                records.append(settled)
        self._write(records, now_ms)
        return len(records)

    # -- per event ----------------------------------------------------------------------

    def _per_event_cancellations(self, now_ms: int, taken: queue.Taken) -> int:
        """Cancellations of the customers `taken` names, not yet settled. A cancel is
        written before its ingest's window job, which names its original's window (if the
        original is in the ledger) or, when the original comes later, the original's job
        names it: either way the (meter, customer) is named once both are in and the push
        of the original exists (it is written with the ledger). The name standing for
        everything walks every customer's cancellations of the lookback. A cycle's cost
        follows the named customers' unsettled cancels, never the history."""
        if not self._per_event:
            return 0
        pairs = None if taken.everything else taken.customers(sorted(self._per_event))
        if pairs == []:
            return 0
        done, after = 0, ("", "", "")
        while True:  # pages, so that cancels that cannot settle never hold back the others
            rows = self._pending_cancels(now_ms, pairs, after)
            done += self._cancel_originals(rows, now_ms)
            if len(rows) < PER_CYCLE:
                return done
            after = rows[-1]

    def _pending_cancels(
        self, now_ms: int, pairs: list[tuple[str, str]] | None, after: tuple[str, str, str]
    ) -> list[tuple[str, str, str]]:
        """(meter, customer, cancelled id) of unsettled cancellations within the lookback (one
        whose original never came is looked at for as long as Stripe could take it), of
        `pairs` (meter, customer) or of all (None), keyed after `after`, PER_CYCLE at most.
        The ledger is not asked: which originals arrived is what the pushes say."""
        rows = self._store.query(
            """SELECT meter, customer_id, cancelled_id FROM cancellations FINAL
               WHERE meter IN {m:Array(String)}
                 AND ({all:UInt8} OR (meter, customer_id) IN {pairs:Array(Tuple(String, String))})
                 AND record_time >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')
                 AND (meter, customer_id, cancelled_id)
                     > ({am:String}, {ac:String}, {ai:String})
                 AND (meter, customer_id, cancelled_id) NOT IN (
                        SELECT meter, customer_id, cancelled_id FROM stripe_corrections
                        WHERE mode = 'per_event' AND meter IN {m:Array(String)}
                          AND ({all:UInt8}
                               OR (meter, customer_id) IN {pairs:Array(Tuple(String, String))}))
               ORDER BY meter, customer_id, cancelled_id LIMIT {n:UInt32}""",
            {
                "m": sorted(self._per_event),
                "all": int(pairs is None),
                "pairs": pairs or [],
                "n": PER_CYCLE,
                "since": now_ms - self._lookback_ms,
                "am": after[0],
                "ac": after[1],
                "ai": after[2],
            },
        )
        return [(str(m), str(c), str(i)) for m, c, i in rows]

    def _cancel_originals(self, rows: list[tuple[str, str, str]], now_ms: int) -> int:
        """Settle each cancellation against its original's push, found by identifier. One
        with no push yet is passed by (its original's window job names it when it comes);
        one whose push's outcome is unknown is named to be looked at again."""
        wanted = {
            per_event_identifier(self._per_event[m].stripe_event_name or "", i): (m, c, i)
            for m, c, i in rows
        }
        pushes = {p.identifier: p for p in outbox.by_identifier(self._store, sorted(wanted))}
        records: list[Record] = []
        again: list[tuple[str, str, int]] = []
        for ident, (meter, customer, cancelled) in wanted.items():
            p = pushes.get(ident)
            if p is None:
                continue
            record = self._settle(
                [p],
                now_ms,
                Record(meter, customer, p.bucket_ms, cancelled, "per_event", "unsent", billed(p)),
            )
            if record is not None:
                records.append(record)
            else:
                again.append((meter, customer, p.bucket_ms))
        self._write(records, now_ms)
        queue.name(self._store, again)  # a wait is no work: the cycle may be idle
        return len(records)

    # -- aggregated ---------------------------------------------------------------------

    def _shrunk_buckets(self, meter: MeterConfig, now_ms: int, taken: queue.Taken) -> int:
        """Buckets whose total fell below what was pushed for them. One still waiting for
        an outcome, or beyond this cycle's share, is named to be looked at again."""
        since = now_ms - self._lookback_ms
        cuts = anchors(self._anchor, self._period, since - DAY_MS, now_ms + DAY_MS)
        check = meter.name not in self._bucketing_checked
        shrunk = outbox.bucket_deltas(
            self._store,
            meter,
            since,
            cuts,
            "w.total < p.pushed",
            check,
            taken.buckets(meter, cuts, since),
        )
        self._bucketing_checked.add(meter.name)
        if not shrunk:
            return 0
        again = [(meter.name, c, b) for c, b, _, _, _ in shrunk[PER_CYCLE:]]
        shrunk = shrunk[:PER_CYCLE]
        handled = self._standing(meter.name, [(c, b) for c, b, _, _, _ in shrunk])
        keys = {
            (c, b)
            for c, b, _, d, _ in shrunk
            if (c, b) not in handled or (handled[c, b] is not None and handled[c, b] != -d)
        }
        by_bucket: dict[tuple[str, int], list[Push]] = {}
        for p in outbox.of_buckets(self._store, meter.name, sorted(keys)):
            by_bucket.setdefault((p.customer_id, p.bucket_ms), []).append(p)
        records: list[Record] = []
        for customer, bucket, _, delta, _ in shrunk:
            if (customer, bucket) not in keys:
                continue  # recorded at this amount already (late, or held), or begun
            base = Record(meter.name, customer, bucket, "", "aggregated", "unsent", -delta)
            record = self._settle(by_bucket.get((customer, bucket), []), now_ms, base)
            if record is not None:
                records.append(record)
            else:
                again.append((meter.name, customer, bucket))
        self._write(records, now_ms)
        queue.name(self._store, again)  # a wait is no work: the cycle may be idle
        return len(records)

    def _standing(
        self, meter: str, keys: list[tuple[str, int]]
    ) -> dict[tuple[str, int], Decimal | None]:
        """(customer, bucket) -> the amount its latest correction left standing (late or
        held): such a bucket is settled until its total moves again. None: an adjustment
        is under way (`_resume` finishes it)."""
        rows = self._store.query(
            """SELECT customer_id, toUnixTimestamp64Milli(bucket_start), outcome,
                      toString(value)
               FROM stripe_corrections FINAL
               WHERE mode = 'aggregated' AND meter = {m:String}
                 AND (customer_id, toUnixTimestamp64Milli(bucket_start))
                     IN {keys:Array(Tuple(String, Int64))}""",
            {"m": meter, "keys": keys},
        )
        return {
            (str(c), int(b)): None if o == ADJUSTING else Decimal(v)
            for c, b, o, v in rows
            if o in ("late", "held", ADJUSTING)
        }

    # -- both -----------------------------------------------------------------------------

    def _settle(
        self, pushes: Sequence[Push], now_ms: int, record: Record, begun: bool = False
    ) -> Record | None:
        """Cancel `pushes` at Stripe and in the outbox, or find it too late; the record of
        what happened, or None while an outcome is still unknown. `begun`: `record` is the
        decision to adjust them, written by an earlier cycle."""
        d = _decide(pushes, now_ms, begun)
        if d.waiting:
            return None
        if begun and not (d.adjust or d.cancel):  # the marks landed; only this record did not
            marked = [p for p in pushes if p.status == CANCELLED]
            return self._done(record, marked, [p for p in marked if p.reason == ABSENT_MARK])
        if not (d.late or d.adjust or d.cancel):
            record.outcome = "held"  # in rejected or expired pushes: nothing is billed
            record.reason = "the cancelled usage is in pushes held for a person"
            return record
        if d.late and d.cancel and record.mode == "aggregated":
            # A revision never sent need never be: take it back first, so that Stripe bills
            # only what was sent too long ago to cancel.
            self._unsend(d.cancel, now_ms)
            record.identifiers = [p.identifier for p in d.cancel]
            excess = record.value - sum((p.value for p in d.cancel), Decimal(0))
            if excess <= 0:  # the bucket is whole again; the planner pushes any growth
                record.outcome = "unsent"
                self._metrics.stripe_corrections.labels(record.meter, "unsent").inc()
                return record
            record.value = excess
        if d.late:
            record.outcome, record.reason = "late", LATE_WHY
            record.identifiers = [p.identifier for p in d.late]
            return self._late(record)
        if d.adjust and not begun:
            intent = replace(record, outcome=ADJUSTING)
            intent.identifiers = [p.identifier for p in d.adjust + d.cancel]
            self._write([intent], now_ms)
            crash_points.reached("after_adjustment_intent")
        absent: list[Push] = []  # Stripe never held them: nothing of them is billed
        refused: list[tuple[Push, str]] = []  # Stripe refused otherwise: it bills them
        for p in d.adjust:  # every revision, whatever Stripe answers for the others
            try:
                self._sender.cancel(p)
            except NoSuchEvent:
                absent.append(p)
            except CannotCancel as exc:
                refused.append((p, str(exc)))
        crash_points.reached("after_stripe_adjustment")
        kept = {p.identifier for p, _ in refused}
        lacking = {p.identifier for p in absent}
        adjusted = [p for p in d.adjust if p.identifier not in kept | lacking]
        marks = [p.moved(CANCELLED, reason="cancelled (adjusted)") for p in adjusted]
        marks += [p.moved(CANCELLED, reason=ABSENT_MARK) for p in absent]
        marks += [p.moved(CANCELLED, reason="cancelled (unsent)") for p in d.cancel]
        if marks:
            outbox.write_moved(self._store, marks, now_ms)
        gone = adjusted + absent + d.cancel
        if refused:
            # Stripe bills the refused pushes: what of them the usage does not cover is
            # what the record's pushes left standing once those cancelled (now, or by the
            # interrupted cycle whose decision this finishes) are taken off.
            before = [p for p in pushes if begun and p.status == CANCELLED]
            excess = record.value - sum((p.value for p in gone + before), Decimal(0))
            if excess > 0:
                record.outcome, record.value = "late", excess
                record.reason = "Stripe refused to cancel: " + "; ".join(w for _, w in refused)
                if begun:
                    record.reason += RETRY_WHY
                if absent:
                    record.reason += f"; {_absent_why(absent)}"
                record.identifiers = [p.identifier for p, _ in refused]
                return self._late(record)
            record.reason = "Stripe refused to cancel some, and the usage covers what it bills"
        return self._done(record, gone, absent, "adjusted" if d.adjust else "unsent")

    def _done(
        self, record: Record, gone: Sequence[Push], absent: Sequence[Push], why: str = "adjusted"
    ) -> Record:
        """`record` of a correction whose pushes are cancelled (`gone`), at Stripe or never
        sent; `absent` among them Stripe did not hold, so it billed none of them."""
        record.outcome = ABSENT if absent else why
        record.identifiers = [p.identifier for p in gone]
        if absent:
            record.reason = "; ".join(w for w in (record.reason, _absent_why(absent)) if w)
            log.warning(
                "cancelled usage of %s for %s (%s): %s",
                record.meter,
                record.customer_id,
                record.cancelled_id or f"bucket at {record.bucket_ms}",
                record.reason,
            )
        self._metrics.stripe_corrections.labels(record.meter, record.outcome).inc()
        return record

    def _unsend(self, pushes: Sequence[Push], now_ms: int, why: str = "unsent") -> None:
        marks = [p.moved(CANCELLED, reason=f"cancelled ({why})") for p in pushes]
        outbox.write_moved(self._store, marks, now_ms)

    def _late(self, record: Record) -> Record:
        self._metrics.stripe_corrections.labels(record.meter, "late").inc()
        log.error(
            "cancelled usage of %s for %s (%s) is still billed by Stripe: %s. Credit the "
            "customer by hand; see the stripe_corrections table and `reconcile`",
            record.meter,
            record.customer_id,
            record.cancelled_id or f"bucket at {record.bucket_ms}",
            record.reason,
        )
        return record

    def _write(self, records: Sequence[Record], now_ms: int) -> None:
        """Insert `records`, each versioned after the row it replaces: the table keeps a
        key's highest updated_at, and the last writer's clock may have been ahead of ours."""
        if not records:
            return
        # The buckets whose pushes this cancelled, named for the planner once the marks are
        # written and before the record that ends the work (a crash between is resumed).
        queue.name(
            self._store,
            [(r.meter, r.customer_id, r.bucket_ms) for r in records if r.mode == "aggregated"],
        )
        before = self._versions(records)
        versions = [max(now_ms, before.get(_key(r), (now_ms - 1, 0))[0] + 1) for r in records]
        self._store.insert_columns(
            "stripe_corrections",
            {
                "meter": pa.array([r.meter for r in records]),
                "customer_id": pa.array([r.customer_id for r in records]),
                "bucket_start": pa.array([r.bucket_ms for r in records], TIME_MS),
                "cancelled_id": pa.array([r.cancelled_id for r in records]),
                "mode": pa.array([r.mode for r in records]),
                "outcome": pa.array([r.outcome for r in records]),
                "value": pa.array([r.value for r in records], DECIMAL),
                "identifiers": pa.array([r.identifiers for r in records], pa.list_(pa.string())),
                "reason": pa.array([r.reason for r in records]),
                "updated_at": pa.array(versions, TIME_MS),
            },
        )
        self._report_late(records, before)

    def _versions(
        self, records: Sequence[Record]
    ) -> dict[tuple[str, str, int, str], tuple[int, Decimal]]:
        """Each key's latest version, and what Stripe still bills by it (late), if any."""
        rows = self._store.query(
            """SELECT meter, customer_id, toUnixTimestamp64Milli(bucket_start), cancelled_id,
                      toUnixTimestamp64Milli(max(updated_at)),
                      toString(argMax(if(outcome = 'late', value, 0), updated_at))
               FROM stripe_corrections
               WHERE (meter, customer_id, toUnixTimestamp64Milli(bucket_start), cancelled_id)
                     IN {keys:Array(Tuple(String, String, Int64, String))}
               GROUP BY 1, 2, 3, 4""",
            {"keys": sorted({_key(r) for r in records})},
        )
        return {
            (str(m), str(c), int(b), str(i)): (int(v), Decimal(late))
            for m, c, b, i, v, late in rows
        }

    def held_anew(self) -> None:
        """The emitter lease was taken (again): another process may have written corrections
        meanwhile, so the overbilled totals are read whole once more."""
        self._overbilled = None

    def _report_late(
        self,
        records: Sequence[Record],
        before: dict[tuple[str, str, int, str], tuple[int, Decimal]],
    ) -> None:
        """The gauge of cancelled usage Stripe still bills, per meter: read whole once a
        lease, then moved by what each write replaces, so a cycle never reads the history."""
        if self._overbilled is None:
            rows = self._store.query(
                """SELECT meter, toString(sum(value)) FROM stripe_corrections FINAL
                   WHERE outcome = 'late' GROUP BY meter"""
            )
            self._overbilled = {str(m): Decimal(v) for m, v in rows}
        else:
            for r in records:
                was = before.get(_key(r), (0, Decimal(0)))[1]
                now = r.value if r.outcome == "late" else Decimal(0)
                self._overbilled[r.meter] = self._overbilled.get(r.meter, Decimal(0)) + now - was
        for meter, value in self._overbilled.items():
            self._metrics.stripe_overbilled.labels(meter).set(float(value))


def _absent_why(absent: Sequence[Push]) -> str:
    ids = ", ".join(p.identifier for p in absent)
    return f"Stripe has no meter event {ids} (lost after its 200): none of it was billed"


def _key(r: Record) -> tuple[str, str, int, str]:
    """A record's key in stripe_corrections (its ORDER BY)."""
    return (r.meter, r.customer_id, r.bucket_ms, r.cancelled_id)
