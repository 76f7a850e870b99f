"""Copies of one event that two processes both accepted count once (consumer/sinks/copies.py).

Two processes have no common ledger lock: each can classify its copy of an event before the
other's row is written, so both copies are accepted and written. Here that is made to
happen on purpose: every copy is accepted, each process's batch is written and its window
job run, in each order two processes could take. The windows must count each event once,
in the copy the rule names (the smallest (minute, customer) of copies within the dedup
horizon of each other), whichever process settled, and also when a process crashed before
its job and its re-formed batch found the other copy (its own stale row then counts or not
by the same rule).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from consumer.clock import SystemClock
from consumer.metrics import Metrics
from consumer.sinks.ledger import accepted_table, batch_id, cancels_of
from consumer.sinks.rollup import Rollup, RollupFailed, WindowJob
from consumer.store.backend import Backend
from tests.integration.test_windows_clickhouse import (
    BASE_MS,
    Copy,
    Ev,
    minutely,
    ranges_for,
    reference,
)
from tests.support.writes import write_effects

pytestmark = pytest.mark.integration

H = 6 * 3_600_000
MINUTE = 60_000
TOPIC = "t.copies"
# How a producer's retry may re-stamp a copy, relative to the first: same instant, within the
# minute, the next minute, an hour either way, at the horizon, and past it (a new event).
SHIFTS = (0, 20_000, 45_000, MINUTE, 61 * MINUTE, -61 * MINUTE, H, H + 2 * MINUTE)


def _rollup(store: Backend) -> Rollup:
    return Rollup(store, "g", TOPIC, SystemClock(), Metrics(), horizon_ms=H)


def _write(store: Backend, copies: Sequence[Copy], held: Sequence[Ev] = ()) -> WindowJob:
    """One process's batch of accepted copies, written; its window job (not run yet).
    `held`: events the batch found in the ledger (duplicates it did not write)."""
    ranges = ranges_for(copies, TOPIC)
    token = batch_id(ranges) + str(time.monotonic_ns())
    write_effects(store, token, ranges, BASE_MS)
    spans = [(r.partition, r.start, r.end) for r in ranges]
    minutes = {(e.meter, e.ts // MINUTE * 60) for e in held}
    return WindowJob.of_batch(token, spans, accepted_table(ranges), cancels_of(ranges), minutes)


def _run(store: Backend, job: WindowJob) -> None:
    r = _rollup(store)
    r.record(job)
    r.submit(job)
    r.close()


def _counted(events: Sequence[Ev]) -> tuple[list[Ev], set[tuple[str, int, str, str]]]:
    """The oracle, written from the rule: per (meter, event id), a copy is superseded when
    another copy within H of it has a smaller (minute, customer). Returns the counted copies
    and the superseded (meter, minute s, customer, event id)."""
    by_id: dict[tuple[str, str], list[Ev]] = {}
    for e in events:
        by_id.setdefault((e.meter, e.event_id), []).append(e)
    counted, superseded = [], set()
    for copies in by_id.values():
        for e in copies:
            mine = (e.ts // MINUTE, e.customer)
            if any(abs(o.ts - e.ts) <= H and (o.ts // MINUTE, o.customer) < mine for o in copies):
                superseded.add((e.meter, e.ts // MINUTE * 60, e.customer, e.event_id))
            else:
                counted.append(e)
    # copies with one ledger identity are one row: the ledger keeps the first recorded
    # (here, with no record delay, the earlier stamp)
    first: dict[tuple[str, str, int, str], Ev] = {}
    for e in sorted(counted, key=lambda x: x.ts):
        first.setdefault(e.identity, e)
    return list(first.values()), superseded


def _superseded(store: Backend) -> set[tuple[str, int, str, str]]:
    rows = store.query(
        """SELECT DISTINCT meter, toUnixTimestamp(minute), customer_id, event_id
           FROM ledger_superseded"""
    )
    return {(str(m), int(w), str(c), str(e)) for m, w, c, e in rows}


def _pairs(seed: int, n: int) -> tuple[list[Ev], list[Ev]]:
    """n events as process A receives them, and the copies process B receives."""
    rng = random.Random(seed)
    a, b = [], []
    for i in range(n):
        meter = rng.choice(("api_calls", "storage_gb"))
        value = Decimal(rng.randint(1, 9))
        first = Ev(meter, f"cus_{rng.randrange(3)}", f"e-{i}", BASE_MS + i * 7_000, value)
        other = first.customer if rng.random() < 0.8 else f"cus_{rng.randrange(3)}"
        b.append(Ev(meter, other, first.event_id, first.ts + rng.choice(SHIFTS), value))
        a.append(first)
    return a, b


Order = Callable[[Backend, list[Ev], list[Ev]], None]


def _one_then_other(store: Backend, a: list[Ev], b: list[Ev]) -> None:
    """A writes and settles before B writes (B settles, sees both)."""
    _run(store, _write(store, [Copy(e, 0, 0) for e in a]))
    _run(store, _write(store, [Copy(e, 1, 0) for e in b]))


def _both_written_a_first(store: Backend, a: list[Ev], b: list[Ev]) -> None:
    """Both write before either settles; A's job runs first."""
    ja = _write(store, [Copy(e, 0, 0) for e in a])
    jb = _write(store, [Copy(e, 1, 0) for e in b])
    _run(store, ja)
    _run(store, jb)


def _both_written_b_first(store: Backend, a: list[Ev], b: list[Ev]) -> None:
    ja = _write(store, [Copy(e, 0, 0) for e in a])
    jb = _write(store, [Copy(e, 1, 0) for e in b])
    _run(store, jb)
    _run(store, ja)


def _a_crashed_then_reformed(store: Backend, a: list[Ev], b: list[Ev]) -> None:
    """A wrote its copies and died before its window job; B then wrote and settled its
    own (seeing A's rows)."""
    _write(store, [Copy(e, 0, 0) for e in a])  # the job was never recorded
    _run(store, _write(store, [Copy(e, 1, 0) for e in b]))
    _reform(store, a, b)


def _a_landed_after_b_settled_then_crashed(store: Backend, a: list[Ev], b: list[Ev]) -> None:
    """A classified before B wrote, but its write landed after B had settled (B saw no
    copy), and A died before its window job: only A's re-formed job can settle these."""
    _run(store, _write(store, [Copy(e, 1, 0) for e in b]))
    _write(store, [Copy(e, 0, 0) for e in a])  # the job was never recorded
    _reform(store, a, b)


def _reform(store: Backend, a: list[Ev], b: list[Ev]) -> None:
    """A's batch, re-formed, finds B's copies within H: those are duplicates now (held), A
    writes nothing new, but its stale rows are still at its positions and its job looks for
    them there. A copy with no other within H is accepted again (the same row)."""
    near = {x.event_id for x, y in zip(a, b, strict=True) if abs(x.ts - y.ts) <= H}
    reformed = ranges_for([Copy(e, 0, 0) for e in a], TOPIC)
    table = accepted_table(reformed)
    fresh = table.filter(pc.invert(pc.is_in(table["event_id"], pa.array(sorted(near)))))
    spans = [(r.partition, r.start, r.end) for r in reformed]
    held = {(e.meter, e.ts // MINUTE * 60) for e in a if e.event_id in near}
    _run(store, WindowJob.of_batch("reformed", spans, fresh, (), held))


ORDERS: dict[str, Order] = {
    "one-then-other": _one_then_other,
    "both-written-a-first": _both_written_a_first,
    "both-written-b-first": _both_written_b_first,
    "a-crashed-reformed": _a_crashed_then_reformed,
    "a-landed-late-crashed-reformed": _a_landed_after_b_settled_then_crashed,
}


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_copies_two_processes_accepted_count_once(migrated_store: Backend, order: str) -> None:
    seed = random.SystemRandom().randrange(10**6)
    print(f"seed={seed}")
    a, b = _pairs(seed, 120)
    ORDERS[order](migrated_store, a, b)
    counted, superseded = _counted([*a, *b])
    assert minutely(migrated_store) == reference(counted, "minute"), f"seed={seed}"
    assert _superseded(migrated_store) == superseded, f"seed={seed}"


def test_without_settling_both_copies_would_count(migrated_store: Backend) -> None:
    """The hazard is real: the same writes with jobs that name no positions (so nothing is
    settled) count both copies of every re-stamped event."""
    a, b = _pairs(7, 60)
    for copies in ([Copy(e, 0, 0) for e in a], [Copy(e, 1, 0) for e in b]):
        job = _write(migrated_store, copies)
        _run(migrated_store, WindowJob(job.token, (), job.minutes, job.windows, job.cancels))
    counted, _ = _counted([*a, *b])
    events = sum(row["count"] or 0 for row in minutely(migrated_store).values())
    assert events == len({e.identity for e in [*a, *b]}) > len(counted)


def test_a_third_copy_settles_against_both(migrated_store: Backend) -> None:
    """Three processes, three stamps of one event: the earliest counts, whichever order."""
    ev = Ev("api_calls", "cus_0", "e-3", BASE_MS + 30 * MINUTE, Decimal(5))
    stamps = [
        ev,
        *(
            Ev(ev.meter, ev.customer, ev.event_id, ev.ts + d, ev.value)
            for d in (
                -2 * MINUTE,
                3 * MINUTE,
            )
        ),
    ]
    for partition, e in zip((2, 0, 1), stamps, strict=True):
        _run(migrated_store, _write(migrated_store, [Copy(e, partition, 0)]))
    assert minutely(migrated_store) == reference([stamps[1]], "minute")
    assert len(_superseded(migrated_store)) == 2


def test_repeating_a_settled_job_changes_nothing(migrated_store: Backend) -> None:
    a, b = _pairs(11, 40)
    _write(migrated_store, [Copy(e, 0, 0) for e in a])
    job = _write(migrated_store, [Copy(e, 1, 0) for e in b])
    for _ in range(2):
        _run(migrated_store, job)
    once = minutely(migrated_store)
    _run(migrated_store, WindowJob(job.token, job.spans, job.minutes))  # read back (recovery)
    assert minutely(migrated_store) == once
    counted, _ = _counted([*a, *b])
    assert once == reference(counted, "minute")


class _DiesAtRecompute:
    """The store, as seen by a process that dies once its copies are named: every window
    insert fails (a crash between the names and the recompute)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    def command_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> None:
        if "INSERT INTO usage_windows" in sql:
            raise KeyError("died")
        self.inner.command_with(sql, inputs, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_crash_between_naming_and_recompute_is_finished_by_the_pending_job(
    migrated_store: Backend,
) -> None:
    a, b = _pairs(13, 60)
    _run(migrated_store, _write(migrated_store, [Copy(e, 0, 0) for e in a]))
    job = _write(migrated_store, [Copy(e, 1, 0) for e in b])
    dying = Rollup(
        _DiesAtRecompute(migrated_store), "g", TOPIC, SystemClock(), Metrics(), horizon_ms=H
    )
    dying.record(job)
    dying.submit(job)
    with pytest.raises(RollupFailed):
        dying.wait()
    counted, superseded = _counted([*a, *b])
    assert _superseded(migrated_store) == superseded  # named before anything else
    assert minutely(migrated_store) != reference(counted, "minute")  # not yet recomputed
    after = _rollup(migrated_store)
    assert after.recover({1: None}) == 1  # the job is still pending: found and run
    after.close()
    assert minutely(migrated_store) == reference(counted, "minute")
