"""`replay`: the minute windows of a time range recomputed from the ledger, after a fix or to
prove a report.

The range is read an hour at a time per meter (the ledger's leading key is meter, minute;
the windows' is meter, customer, minute), so no read grows with the store's history. Each
hour's windows as the ledger makes them now are compared with the stored ones; only windows
that differ are written, by the rollup's own recompute (consumer/sinks/rollup.py), which
names them in `planning_queue`: the emitter then plans an aggregated meter's buckets by
difference, pushing growth as a new revision and taking a shrunk bucket back through its
corrections (adjusted within Stripe's 24 hours, `late` after), exactly as for windows the
rollup rewrote. A window that did not change is not written and not named: it causes
nothing. Per-event meters bill every ledger row as its own push, so a replay corrects their
windows (what analysts and `reconcile`'s usage column read) and sends Stripe nothing.

Crash-safe: the changed windows of an hour are recorded as a window job (no spans, token
`replay-...`) before they are written and marked done after they are named. A kill between
the window rows and their names would leave windows that equal the ledger (a re-run sees no
change) but that the emitter never planned; so every run first finishes the replay jobs
left pending, recomputing and naming every window of their minutes (naming an unchanged
window only makes the planner find nothing). A second run changes nothing.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from consumer import crash_points
from consumer.config import MeterConfig, Settings
from consumer.ops.reconcile import ReconcileError, parse_time
from consumer.ops.totals import format_table
from consumer.sinks.rollup import (
    DONE,
    PENDING,
    WindowJob,
    from_ledger,
    recompute,
    window_table,
    write_jobs,
)
from consumer.store import open_store
from consumer.store.backend import Backend

SLICE = 3600  # seconds of the range read at once, per meter
TOKEN = "replay-"
_MINUTES = "{mm:Array(Tuple(String, DateTime('UTC')))}"
_ZERO = ("0", 0, "0", "0", "0", 0, "0", 0)  # a window whose events were all cancelled


@dataclass(frozen=True)
class Change:
    """One window whose stored row differs from the ledger: old and new are the meter's
    measure (sum, count or last value); None = no row."""

    meter: str
    customer: str
    start: int
    old: Decimal | None
    new: Decimal | None

    @property
    def difference(self) -> Decimal:
        return (self.new or Decimal(0)) - (self.old or Decimal(0))


@dataclass(frozen=True)
class Where:
    """What a replay writes its jobs under (the consumer's group and topic) and its clock."""

    group: str
    topic: str
    now_ms: Callable[[], int]


def replay(
    store: Backend,
    meters: Sequence[MeterConfig],
    start: int,
    end: int,
    where: Where,
    *,
    customer: str | None = None,
    dry_run: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[list[Change], int]:
    """Recompute [start, end) (epoch seconds) for `meters`; returns the changed windows and
    how many windows were compared. With `dry_run` nothing is written."""
    if not dry_run:
        resumed = finish_pending(store, where)
        if resumed:
            progress(f"replay: finished {resumed} replay jobs a crash left pending")
    changes: list[Change] = []
    compared = 0
    slices = list(range(start - start % SLICE, end, SLICE))
    for i, lo in enumerate(slices):
        a, b = max(lo, start), min(lo + SLICE, end)
        for meter in meters:
            found, n = _diff(store, meter, a, b, customer)
            compared += n
            if found and not dry_run:
                _write(store, meter.name, a, b, found, where)
            changes += found
        if len(slices) > 1 and (i + 1 == len(slices) or (i + 1) % 24 == 0):
            progress(
                f"replay: {_iso(b)} done ({i + 1}/{len(slices)} hours), "
                f"{compared} windows compared, {len(changes)} changed"
            )
    return changes, compared


def _diff(
    store: Backend, meter: MeterConfig, lo: int, hi: int, customer: str | None
) -> tuple[list[Change], int]:
    """The windows of [lo, hi) whose stored row differs from the ledger, and how many
    windows there are on either side."""
    new = {
        (str(r[0]), int(r[1])): _row(r[2:])
        for r in from_ledger(store, meter.name, lo, hi, customer)
    }
    old = {
        (str(r[0]), int(str(r[1]))): _row(r[2:])
        for r in _stored(store, meter.name, lo, hi, customer)
    }
    out = []
    for key in sorted(new.keys() | old.keys()):
        was, now = old.get(key), new.get(key)
        if (was or _ZERO) != (now or _ZERO):
            out.append(
                Change(meter.name, key[0], key[1], _measure(meter, was), _measure(meter, now))
            )
    return out, len(new.keys() | old.keys())


def _row(r: Sequence[object]) -> tuple[object, ...]:
    """A window row's aggregates, comparable whichever table they were read from."""
    s, n, lo, hi, first, first_t, last, last_t = r
    return (
        str(Decimal(str(s)).normalize()), int(str(n)), str(Decimal(str(lo)).normalize()),
        str(Decimal(str(hi)).normalize()), str(Decimal(str(first)).normalize()),
        int(str(first_t)), str(Decimal(str(last)).normalize()), int(str(last_t)),
    ) if int(str(n)) else _ZERO  # fmt: skip


def _measure(meter: MeterConfig, row: tuple[object, ...] | None) -> Decimal | None:
    if row is None or row == _ZERO:
        return None
    if meter.aggregation == "count":
        return Decimal(int(str(row[1])))
    if meter.aggregation == "last":
        return Decimal(str(row[6]))
    return Decimal(str(row[0]))


def _stored(
    store: Backend, meter: str, lo: int, hi: int, customer: str | None
) -> list[tuple[object, ...]]:
    return store.query(
        """SELECT customer_id, toUnixTimestamp(window_start), toString(sum_value), event_count,
                  toString(min_value), toString(max_value), toString(first_value),
                  toUnixTimestamp64Milli(first_time), toString(last_value),
                  toUnixTimestamp64Milli(last_time)
           FROM usage_windows FINAL
           WHERE meter = {m:String} AND ({c:String} = '' OR customer_id = {c:String})
             AND window_start >= toDateTime({lo:Int64}, 'UTC')
             AND window_start < toDateTime({hi:Int64}, 'UTC')
           ORDER BY customer_id, window_start""",
        {"m": meter, "lo": lo, "hi": hi, "c": customer or ""},
    )


def _write(
    store: Backend, meter: str, lo: int, hi: int, changes: Sequence[Change], where: Where
) -> None:
    """The job first, then the windows (rows, then names), then the job done."""
    keys = [(meter, c.customer, c.start) for c in changes]
    digest = hashlib.sha256(repr((meter, lo, hi, keys)).encode()).hexdigest()[:32]
    job = WindowJob(TOKEN + digest, (), tuple(sorted({(meter, c.start) for c in changes})))
    write_jobs(store, where.group, where.topic, [job], PENDING, where.now_ms())
    crash_points.reached("after_replay_job")
    windows = window_table(keys)
    recompute(store, windows, taken=windows)  # taken: a window left without events is zeroed
    crash_points.reached("after_replay_windows")
    write_jobs(store, where.group, where.topic, [job], DONE, where.now_ms())


def finish_pending(store: Backend, where: Where) -> int:
    """Recompute and name every window of the minutes of replay jobs left pending."""
    rows = store.query(
        """SELECT token, arrayMap(x -> (x.1, toUnixTimestamp(x.2)), minutes)
           FROM window_jobs FINAL
           WHERE group_id = {g:String} AND topic = {t:String} AND state = 1
             AND startsWith(token, {p:String})
           ORDER BY written_at, token""",
        {"g": where.group, "t": where.topic, "p": TOKEN},
    )
    for token, minutes in rows:
        mm = [(str(m), int(w)) for m, w in minutes]
        keys = _windows_at(store, mm)
        if keys:
            windows = window_table(keys)
            recompute(store, windows, taken=windows)
        write_jobs(
            store,
            where.group,
            where.topic,
            [WindowJob(str(token), (), tuple(mm))],
            DONE,
            where.now_ms(),
        )
    return len(rows)


def _windows_at(store: Backend, minutes: Sequence[tuple[str, int]]) -> list[tuple[str, str, int]]:
    """Every window, stored or in the ledger, of these (meter, minute)s."""
    rows = store.query(
        f"""SELECT meter, customer_id, toUnixTimestamp(window_start) FROM usage_windows FINAL
           WHERE (meter, window_start) IN {_MINUTES}
           UNION DISTINCT
           SELECT meter, customer_id, toUnixTimestamp(toStartOfMinute(event_time))
           FROM usage_events WHERE (meter, toStartOfMinute(event_time)) IN {_MINUTES}""",
        {"mm": list(minutes)},
    )
    return sorted({(str(m), str(c), int(w)) for m, c, w in rows})


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _num(v: Decimal | None) -> str:
    return "-" if v is None else (format(v.normalize(), "f") if v else "0")


def format_changes(changes: Sequence[Change], compared: int, dry_run: bool) -> str:
    """One row per changed window, and the verdict line."""
    header = ["meter", "customer", "window", "old", "new", "difference"]
    rows = [
        [c.meter, c.customer, _iso(c.start), _num(c.old), _num(c.new), _num(c.difference)]
        for c in changes
    ]
    verdict = f"replay: windows={compared} changed={len(changes)} " + (
        "(dry run: nothing written)" if dry_run else f"rewritten={len(changes)}"
    )
    return (format_table(header, rows) + "\n" if rows else "") + verdict


class ReplayError(ValueError):
    """Arguments a replay cannot take; phrased for the command line."""


def run_replay(
    settings: Settings,
    start_text: str,
    end_text: str,
    meter: str | None,
    customer: str | None,
    dry_run: bool,
) -> int:
    """The `replay` command: bounds as RFC 3339 or epoch seconds, widened to whole minutes;
    progress on stderr, the changes and the verdict on stdout."""
    try:
        start, end = parse_time(start_text), parse_time(end_text)
    except ReconcileError as exc:
        raise ReplayError(str(exc)) from None
    start, end = start - start % 60, -(-end // 60) * 60
    if end <= start:
        raise ReplayError("--to must be after --from")
    meters = [m for m in settings.meters if meter in (None, m.name)]
    if not meters:
        known = ", ".join(m.name for m in settings.meters)
        raise ReplayError(f"no meter {meter!r} in the configuration (meters: {known})")
    k = settings.kafka
    where = Where(k.group_id, k.topic, lambda: int(time.time() * 1000))
    store = open_store(settings.clickhouse)
    try:
        changes, compared = replay(
            store, meters, start, end, where, customer=customer, dry_run=dry_run,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )  # fmt: skip
    finally:
        store.close()
    print(format_changes(changes, compared, dry_run))
    return 0
