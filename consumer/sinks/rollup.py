"""Rollup stage: the minute windows of committed batches, recomputed behind the consume loop.

Before a batch's ranges are done it records a window job: its ranges and the minutes its
events touched. The rollup thread then recomputes those windows from the deduplicated
ledger (set semantics, P3) and marks the job done. Jobs run one at a time in the order
their batches finished, so a window is never overwritten by an older reading of the
ledger; and at most `depth` wait, so the windows trail the commits by a batch or two. A
crash before a job is done leaves it pending: it is run again when a partition it names is
next assigned, its windows found from the ledger rows at its ranges' positions. Running a
job twice converges, so nothing here is ever lost or counted twice.

Recomputing windows is the most expensive write of a batch (about 4 us an event); off the
commit path it runs while the next batch is read and classified.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from consumer import crash_points
from consumer.clock import Clock
from consumer.liveness import Heartbeat
from consumer.metrics import Metrics
from consumer.records import TIME_MS
from consumer.sinks.copies import NOT_SUPERSEDED, Span, at_positions, settle_copies
from consumer.store.backend import Backend, StoreBug, StoreUnavailable

log = logging.getLogger(__name__)
Cancel = tuple[str, str, str, int]  # (meter, customer, cancelled event id, cancel's time ms)
# How far apart in event time a cancel and its original may be: Stripe bills no usage older
# than 35 days, and the consumer accepts none older than that behind its record time, so an
# original is looked for within it (the ledger's minutes there, never its history), after
# a first look in the hours around the cancel, where producers' cancels find theirs.
CANCEL_NEAR_MS = 6 * 3_600_000
CANCEL_REACH_MS = 35 * 86_400_000
PENDING, DONE = 1, 2
MAX_BACKOFF = 5.0
_WINDOW_START = pa.timestamp("s", tz="UTC")


# --- the recompute ---------------------------------------------------------------------


def recompute(
    store: Backend,
    windows: pa.Table,
    cancels: Sequence[Cancel] = (),
    threads: int = 0,
    taken: pa.Table | None = None,
) -> None:
    """Upsert the windows, each recomputed from the whole ledger without cancelled events.
    The windows of the events `cancels` takes back are found in the ledger now, not when the
    cancels were written, so a retry finds an original another partition wrote meanwhile;
    one of them left without events is written as a zero row (the analyst views leave those
    out). Any other window keeps an event: the batch's own is in the ledger unless it was
    cancelled, and then the window was a cancelled one when that cancel came.

    The ledger is keyed by (meter, minute) first, so the aggregate reads those minutes only;
    of their rows it keeps those whose window's 64-bit hash is a dirty one's (a set of
    hashes costs about half a set of string tuples). A collision only adds a window, and
    that one is recomputed whole as well: its minute is one of those read. `threads` bounds
    the aggregate's ClickHouse threads (0: ClickHouse's default). `taken`: windows that lost
    a superseded copy (sinks/copies.py), recomputed like those of cancels."""
    emptied = _cancelled_windows(store, cancels) if cancels else None
    if taken is not None and taken.num_rows:
        emptied = taken if emptied is None else _distinct(pa.concat_tables([emptied, taken]))
    if emptied is not None:
        windows = _distinct(pa.concat_tables([windows, emptied]))
    if not windows.num_rows:
        return
    store.command_with(
        f"""INSERT INTO usage_windows
           SELECT meter, customer_id, toDateTime(toStartOfMinute(event_time), 'UTC') AS ws,
                  sum(value), count(), min(value), max(value),
                  argMin(value, (event_time, event_id)), min(event_time),
                  argMax(value, (event_time, event_id)), max(event_time), {_COMPUTED_AT}
           FROM usage_events FINAL
           WHERE {_IN_MINUTES}
             AND {_WINDOW_HASH.format(t="ws")} IN (
                     SELECT {_WINDOW_HASH.format(t="window_start")} FROM $dirty)
             AND {_NOT_CANCELLED}
             AND {NOT_SUPERSEDED}
           GROUP BY meter, customer_id, ws
           SETTINGS max_threads = {int(threads)}""",
        {"dirty": windows, "pairs": _pairs(windows)},
        {"mm": minutes_of(windows)},
    )
    if emptied is not None and emptied.num_rows:
        store.command_with(
            f"""INSERT INTO usage_windows
               SELECT meter, customer_id, window_start, 0, 0, 0, 0, 0, toDateTime64(0, 3, 'UTC'),
                      0, toDateTime64(0, 3, 'UTC'), {_COMPUTED_AT}
               FROM $emptied
               WHERE (meter, customer_id, window_start) NOT IN (
                   SELECT meter, customer_id, toDateTime(toStartOfMinute(event_time), 'UTC')
                   FROM usage_events FINAL
                   WHERE {_IN_MINUTES} AND {_NOT_CANCELLED} AND {NOT_SUPERSEDED})""",
            {"emptied": emptied, "pairs": _pairs(emptied)},
            {"mm": minutes_of(emptied)},
        )
    crash_points.reached("after_window_rows")
    # Named for the emitter once their rows are written: it plans the buckets named since it
    # last planned (migration 21), so a crash before this line leaves the job pending.
    store.command_with(
        f"""INSERT INTO planning_queue (meter, customer_id, window_start, version, planned)
           SELECT meter, customer_id, window_start, {_COMPUTED_AT}, 0 FROM $windows""",
        {"windows": windows},
    )


# A window row's version (usage_windows is ReplacingMergeTree(computed_at)): the server's
# clock when the recompute's statement starts, before it takes its snapshot of the ledger.
# A recompute that starts later sees every ledger row an earlier one saw, and each ledger row
# is followed by a recompute of its window that starts after the row is durable; so the
# newest version holds every row, whichever process ran it and in whichever order the
# inserts land (a stale recompute landing last no longer wins). Nanoseconds make equal
# versions of different snapshots practically impossible; it assumes the server's clock
# does not step back.
_COMPUTED_AT = "now64(9, 'UTC')"
_WINDOW_HASH = "cityHash64(meter, customer_id, toUnixTimestamp({t}))"
# The ledger's leading key: the minutes of the windows at hand.
_IN_MINUTES = "(meter, toStartOfMinute(event_time)) IN {mm:Array(Tuple(String, DateTime('UTC')))}"
_NOT_CANCELLED = """(meter, customer_id, event_id) NOT IN (
        SELECT meter, customer_id, cancelled_id FROM cancellations
        WHERE (meter, customer_id) IN (SELECT meter, customer_id FROM $pairs))"""


def from_ledger(
    store: Backend, meter: str, lo_s: int, hi_s: int, customer: str | None
) -> list[tuple[Any, ...]]:
    """The minute windows of `meter` in [lo_s, hi_s) as a recompute would write them now
    (cancelled and superseded events left out), without writing them: (customer, window
    start s, sum, count, min, max, first, first time ms, last, last time ms), values as
    text. Reads the ledger's minutes there (its leading key) and the cancellations of the
    customers found there (by key)."""
    minutes = [(meter, t) for t in range(lo_s - lo_s % 60, hi_s, 60)]
    in_range = """meter = {m:String} AND event_time >= toDateTime64({lo:Int64}, 3, 'UTC')
                  AND event_time < toDateTime64({hi:Int64}, 3, 'UTC')
                  AND ({c:String} = '' OR customer_id = {c:String})"""
    return store.query(
        f"""SELECT customer_id, toUnixTimestamp(toStartOfMinute(event_time)) AS ws,
                  toString(sum(value)), count(), toString(min(value)), toString(max(value)),
                  toString(argMin(value, (event_time, event_id))),
                  toUnixTimestamp64Milli(min(event_time)),
                  toString(argMax(value, (event_time, event_id))),
                  toUnixTimestamp64Milli(max(event_time))
           FROM usage_events FINAL
           WHERE {in_range}
             AND (meter, customer_id, event_id) NOT IN (
                 SELECT meter, customer_id, cancelled_id FROM cancellations
                 WHERE (meter, customer_id) IN (
                     SELECT DISTINCT meter, customer_id FROM usage_events WHERE {in_range}))
             AND {NOT_SUPERSEDED}
           GROUP BY customer_id, ws ORDER BY customer_id, ws""",
        {"m": meter, "lo": lo_s, "hi": hi_s, "c": customer or "", "mm": minutes},
    )


def window_table(rows: Sequence[tuple[str, str, int]]) -> pa.Table:
    """(meter, customer, window start s) rows as the windows table recompute() takes."""
    return _windows(rows)


def touched_windows(accepted: pa.Table) -> pa.Table:
    """Distinct (meter, customer, minute) of the events, computed by Arrow."""
    minute = pc.floor_temporal(accepted["event_time"], unit="minute")
    keys = pa.table(
        {
            "meter": accepted["meter"],
            "customer_id": accepted["customer_id"],
            "window_start": pc.cast(minute, _WINDOW_START),
        }
    )
    return _distinct(keys)


def minutes_of(windows: pa.Table) -> list[tuple[str, int]]:
    """Distinct (meter, minute start in epoch seconds) of the windows."""
    found = windows.group_by(["meter", "window_start"]).aggregate([])
    starts = pc.cast(found["window_start"], pa.int64()).to_pylist()
    return list(zip(found["meter"].to_pylist(), starts, strict=True))


def _distinct(windows: pa.Table) -> pa.Table:
    return windows.group_by(list(windows.column_names)).aggregate([])


def _pairs(windows: pa.Table) -> pa.Table:
    return windows.group_by(["meter", "customer_id"]).aggregate([])


def _windows(rows: Sequence[Sequence[object]]) -> pa.Table:
    return pa.table(
        {
            "meter": pa.array([str(r[0]) for r in rows], pa.string()),
            "customer_id": pa.array([str(r[1]) for r in rows], pa.string()),
            "window_start": pa.array([int(str(r[2])) for r in rows], _WINDOW_START),
        }
    )


def _cancelled_windows(store: Backend, cancels: Sequence[Cancel]) -> pa.Table:
    """The windows of the originals the cancels take back, looked for by the 8-byte id key:
    first in the minutes near the cancels' event times (a producer takes usage back soon),
    then, for those not found there, within CANCEL_REACH_MS; never in the whole history."""
    found: list[tuple[Any, ...]] = []
    todo = list(cancels)
    for reach in (CANCEL_NEAR_MS, CANCEL_REACH_MS):
        if not todo:
            break
        rows = _originals(store, todo, reach)
        found += rows
        seen = {(str(m), str(c), str(e)) for m, c, e, _ in rows}
        todo = [x for x in todo if x[:3] not in seen]
    return _windows(sorted({(m, c, w) for m, c, _, w in found}))


def _originals(store: Backend, cancels: Sequence[Cancel], reach_ms: int) -> list[tuple[Any, ...]]:
    times = [c[3] for c in cancels]
    return store.query(
        """SELECT DISTINCT meter, customer_id, event_id,
                  toUnixTimestamp(toStartOfMinute(event_time))
           FROM usage_events
           PREWHERE meter IN {m:Array(String)}
                AND event_time BETWEEN fromUnixTimestamp64Milli({lo:Int64}, 'UTC')
                                   AND fromUnixTimestamp64Milli({hi:Int64}, 'UTC')
                AND id_key IN (SELECT sipHash64(c.1, c.2) FROM (
                                   SELECT arrayJoin({k:Array(Tuple(String, String))}) AS c))
           WHERE (meter, customer_id, event_id) IN {c:Array(Tuple(String, String, String))}""",
        {
            "m": sorted({c[0] for c in cancels}),
            "lo": min(times) - reach_ms,
            "hi": max(times) + reach_ms,
            "k": sorted({(c[0], c[2]) for c in cancels}),
            "c": sorted({c[:3] for c in cancels}),
        },
    )


def windows_at(
    store: Backend, topic: str, spans: Sequence[Span], minutes: Sequence[tuple[str, int]]
) -> pa.Table:
    """The windows of the ledger rows a batch wrote (recovery: the batch is gone)."""
    if not spans or not minutes:
        return _windows([])
    rows = store.query(
        f"""SELECT DISTINCT meter, customer_id, toUnixTimestamp(toStartOfMinute(event_time))
            FROM usage_events
            WHERE {_IN_MINUTES} AND topic = {{t:String}} AND ({at_positions(spans)})""",
        {"mm": list(minutes), "t": topic},
    )
    return _windows(rows)


def cancels_at(store: Backend, topic: str, spans: Sequence[Span]) -> list[Cancel]:
    """What the cancel events a batch wrote take back (recovery)."""
    if not spans:
        return []
    rows = store.query(
        f"""SELECT meter, customer_id, cancelled_id, max(toUnixTimestamp64Milli(event_time))
            FROM cancellations WHERE topic = {{t:String}} AND ({at_positions(spans)})
            GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""",
        {"t": topic},
    )
    return [(str(m), str(c), str(i), int(t)) for m, c, i, t in rows]


# --- the jobs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowJob:
    """The windows one batch touched. `windows` and `cancels` are None for a job read back
    after a crash: they are then found from the ledger rows at the batch's positions."""

    token: str
    spans: tuple[Span, ...]
    minutes: tuple[tuple[str, int], ...]
    windows: pa.Table | None = None
    cancels: tuple[Cancel, ...] | None = None

    @classmethod
    def of_batch(
        cls,
        token: str,
        spans: Sequence[Span],
        accepted: pa.Table,
        cancels: Sequence[Cancel],
        held: Iterable[tuple[str, int]] = (),
    ) -> WindowJob:
        """`held`: the (meter, minute) of the batch's events that are duplicates of a
        ledger copy; settling looks there too, for a row an earlier attempt of the batch
        wrote when it accepted one of them (sinks/copies.py)."""
        windows = touched_windows(accepted)
        minutes = sorted({*minutes_of(windows), *held})
        return cls(token, tuple(spans), tuple(minutes), windows, tuple(cancels))


class Rollup:
    """Runs window jobs on a thread of its own, in order; see the module docstring."""

    def __init__(
        self,
        store: Backend,
        group: str,
        topic: str,
        clock: Clock,
        metrics: Metrics,
        depth: int = 1,
        threads: int = 0,
        *,
        horizon_ms: int,
        heartbeat: Heartbeat | None = None,
        waiting: Heartbeat | None = None,
    ) -> None:
        """`heartbeat`: this thread's, for /healthz; `waiting`: the consume loop's, which
        beats while it waits here for room (waiting on a rollup that beats is not stuck)."""
        self.store, self.group, self.topic = store, group, topic
        self._heartbeat, self._waiting = heartbeat, waiting
        self._threads, self._horizon_ms = threads, horizon_ms
        self._clock, self._metrics = clock, metrics
        self._queue: queue.Queue[WindowJob | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._loop, name="rollup", daemon=True)
        self._stop = threading.Event()
        self.failure: BaseException | None = None
        self.healthy = True
        # partition -> end of the ranges whose windows are recomputed: what analysts see
        self.visible: dict[int, int] = {}
        self.submitted = 0  # jobs ever queued (consumer/emitter/loop.py: Upstream)

    def record(self, job: WindowJob) -> None:
        """Make the job durable (before its ranges are done): it will run, crash or not."""
        self._write([job], PENDING)
        crash_points.reached("after_window_job")

    def submit(self, job: WindowJob) -> None:
        """Queue the job; blocks while `depth` jobs wait (the windows never fall behind
        further). Raises RollupFailed if the thread failed (it may still be ending: a job
        queued then would never run)."""
        self.check()
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()
        while True:
            try:
                self._queue.put(job, timeout=1.0)
                break
            except queue.Full:
                self.check()
                if self._waiting is not None:
                    self._waiting.beat()
        self.submitted += 1
        self._metrics.rollup_jobs.set(self.behind)
        # The emitter plans from these windows once they are written: whatever its last
        # cycle found, the outbox is not idle now (a drain check must not read a stale 1).
        self._metrics.stripe_idle.set(0)

    @property
    def behind(self) -> int:
        """Jobs queued or running: committed batches whose windows are not recomputed yet
        (the emitter plans aggregated pushes from those windows, so it is not idle)."""
        return self._queue.unfinished_tasks

    def recover(self, resumed: Mapping[int, int | None]) -> int:
        """Queue the pending jobs that name any of these partitions (after a crash, or
        another instance's); returns how many. `resumed`: partition -> where it resumes;
        without a pending job, its windows are whole up to there. Raises StoreError if the
        jobs cannot be read."""
        partitions = sorted(resumed)
        if not partitions:
            return 0
        rows = self.store.query(
            """SELECT token, spans, arrayMap(x -> (x.1, toUnixTimestamp(x.2)), minutes)
               FROM window_jobs FINAL
               WHERE group_id = {g:String} AND topic = {t:String} AND state = 1
                 AND arrayExists(s -> s.1 IN {p:Array(UInt32)}, spans)
               ORDER BY written_at, token""",
            {"g": self.group, "t": self.topic, "p": list(partitions)},
        )
        for token, spans, minutes in rows:
            self.submit(
                WindowJob(
                    str(token),
                    tuple((int(p), int(a), int(b)) for p, a, b in spans),
                    tuple((str(m), int(w)) for m, w in minutes),
                )
            )
        named = {int(p) for _, spans, _ in rows for p, _, _ in spans}
        for p, offset in resumed.items():
            if offset is not None and p not in named:
                self.visible[p] = max(self.visible.get(p, 0), offset)
        if rows:
            log.warning("recomputing the windows of %d batches left pending", len(rows))
        return len(rows)

    def wait(self) -> None:
        """Until every queued job has run (a graceful stop; tests reading windows)."""
        while self._thread.is_alive() and self._queue.unfinished_tasks:
            self.check()
            self._clock.sleep(0.01)
        self.check()

    def check(self) -> None:
        if isinstance(self.failure, StoreBug):  # the statement and its code, in one line
            raise self.failure
        if self.failure is not None:
            raise RollupFailed(f"the window rollup stopped: {self.failure!r}") from self.failure

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        if self._thread.is_alive():
            self.wait()
            self._stop.set()
            self._queue.put(None)
            self._thread.join()
        self._stop.set()

    def _beat(self, busy: bool = True) -> None:
        if self._heartbeat is not None:
            self._heartbeat.beat(busy)

    def _loop(self) -> None:
        try:
            self._beat(busy=False)
            while (job := self._queue.get()) is not None:
                self._beat()
                self._run(job)
                self._queue.task_done()
                self._metrics.rollup_jobs.set(self.behind)
                self._beat(busy=False)  # about to wait for the next job
        except BaseException as exc:  # a bug: the consume loop stops on its next submit
            self.failure = exc
            log.exception("the window rollup failed")
            raise

    def _run(self, job: WindowJob) -> None:
        failures = 0
        while True:
            try:
                with self._metrics.insert_seconds.labels("usage_windows").time():
                    self._recompute(job)
                self._write([job], DONE)
                self.healthy = True
                for p, _, end in job.spans:
                    self.visible[p] = max(self.visible.get(p, 0), end)
                return
            except StoreUnavailable as exc:  # the job stays, nothing moves on without it
                self._beat()  # retrying is not stuck
                failures += 1
                self.healthy = False
                self._metrics.clickhouse_errors.labels("rollup").inc()
                log.warning("window rollup failed, retrying: %s", exc)
                if self._stop.is_set():
                    raise
                self._clock.sleep(min(MAX_BACKOFF, 0.1 * 2 ** min(failures, 10)))

    def _recompute(self, job: WindowJob) -> None:
        windows = job.windows
        if windows is None:
            windows = windows_at(self.store, self.topic, job.spans, job.minutes)
        cancels = job.cancels
        if cancels is None:
            cancels = tuple(cancels_at(self.store, self.topic, job.spans))
        taken = settle_copies(self.store, self.topic, job.spans, job.minutes, self._horizon_ms)
        recompute(self.store, windows, cancels, self._threads, taken)

    def _write(self, jobs: Sequence[WindowJob], state: int) -> None:
        write_jobs(self.store, self.group, self.topic, jobs, state, int(self._clock.now() * 1000))


def write_jobs(
    store: Backend, group: str, topic: str, jobs: Sequence[WindowJob], state: int, now_ms: int
) -> None:
    """Window job rows at `state` (PENDING or DONE)."""
    n = len(jobs)
    span_type = pa.list_(pa.struct([("p", pa.uint32()), ("a", pa.uint64()), ("b", pa.uint64())]))
    minute_type = pa.list_(pa.struct([("m", pa.string()), ("w", _WINDOW_START)]))
    store.insert_columns(
        "window_jobs",
        {
            "group_id": pa.array([group] * n, pa.string()),
            "topic": pa.array([topic] * n, pa.string()),
            "token": pa.array([j.token for j in jobs], pa.string()),
            "spans": pa.array(
                [[{"p": p, "a": a, "b": b} for p, a, b in j.spans] for j in jobs], span_type
            ),
            "minutes": pa.array(
                [[{"m": m, "w": w} for m, w in j.minutes] for j in jobs], minute_type
            ),
            "state": pa.array([state] * n, pa.uint8()),
            "written_at": pa.array([now_ms] * n, TIME_MS),
        },
    )


class RollupFailed(Exception):
    """The rollup thread died; the process stops so that it is restarted and seen."""
