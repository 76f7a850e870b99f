"""The emitter's open work (stripe_open, migration 18) in chDB.

- on random outboxes (ranks written in any order, pending rows rewritten after a push
  settled, tidies in between) every read of open work returns exactly what a model of
  the outbox computed in Python from the rows written says
- the reads are bounded by the open work: over 1,000,000 settled pushes they pass with
  ClickHouse's `max_rows_to_read` far below that, where the whole-table read is refused
- a crash between a settled mark and its name (or before an intent's push is written)
  neither sends a push twice nor leaves one stuck; the migration names the open pushes of
  a store written before it
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer import crash_points
from consumer.config import ClickHouseConfig
from consumer.emitter.plan import outbox
from consumer.emitter.plan.outbox import (
    ATTEMPTED,
    CANCELLED,
    COLUMNS,
    EXPIRED,
    PENDING,
    REDATED,
    REJECTED,
    SENT,
    SENT_V1,
    Push,
)
from consumer.emitter.truth import minutes, standing
from consumer.local.emulator import EmulatorServer
from consumer.store import open_store
from consumer.store.backend import Backend
from consumer.store.migrations import MIGRATIONS, migrate
from tests.integration.conftest import METERS
from tests.integration.test_migrations import _upto
from tests.integration.test_stripe_delivery import Rig, drain, open_rig, per_event
from tests.integration.test_stripe_delivery import server as server  # a fixture

pytestmark = pytest.mark.integration
NOW = 1_790_000_000_000
HOUR = 3_600_000
RANKS = [PENDING, SENT_V1, ATTEMPTED, EXPIRED, REDATED, SENT, REJECTED, CANCELLED]


@pytest.fixture
def shared(migrated_store: Backend) -> Backend:
    """One store for every example of a test (chDB holds one store path per process)."""
    return migrated_store


def push(i: int, rank: int, attempt_ms: int = 0, ts_ms: int | None = None) -> Push:
    bucket = NOW - (i % 7) * 6 * HOUR
    ts = bucket if ts_ms is None else ts_ms
    return Push(f"p{i:04d}", "per_event", "m", "m", f"c{i % 3}", bucket, 0, Decimal(i), attempt_ms,
                rank, 0 if ts == bucket else ts)  # fmt: skip


# -- (a) the same pushes as a model of the outbox ---------------------------------------


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[int, int, int, bool]]:
    """(push, rank, first attempt, tidy after) writes: each push's ranks in any order."""
    out = []
    for i in range(draw(st.integers(1, 30))):
        for rank in draw(st.lists(st.sampled_from(RANKS), min_size=1, max_size=4)):
            attempt = (
                0
                if rank == PENDING and draw(st.booleans())
                else NOW - draw(st.sampled_from([1, 5 * HOUR, 30 * HOUR]))
            )
            out.append((i, rank, attempt, draw(st.booleans())))
    return draw(st.permutations(out))


def model(writes: list[tuple[int, int, int, bool]]) -> dict[str, Push]:
    """stripe_pushes FINAL, in Python: per identifier the highest rank, the last written
    among equals."""
    state: dict[str, Push] = {}
    for i, rank, attempt, _ in writes:
        p = push(i, rank, attempt)
        old = state.get(p.identifier)
        if old is None or rank >= old.status:
            state[p.identifier] = p
    return state


def attempted(p: Push) -> bool:
    return p.status in (ATTEMPTED, REDATED) or (p.status == PENDING and p.first_attempt_ms > 0)


def ids(pushes: list[Push]) -> list[str]:
    return [p.identifier for p in pushes]


def ordered(pushes: list[Push]) -> list[str]:
    return ids(sorted(pushes, key=lambda p: (p.bucket_ms, p.identifier)))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(writes=histories(), tidy_at=st.sampled_from([0, 3, 1_000]))
def test_open_work_reads_return_what_the_outbox_holds(
    shared: Backend, writes: list[tuple[int, int, int, bool]], tidy_at: int
) -> None:
    store = shared
    store.command("TRUNCATE TABLE stripe_pushes")
    store.command("TRUNCATE TABLE stripe_open")
    for i, rank, attempt, tidy_after in writes:
        outbox.write(store, [push(i, rank, attempt)], rank, NOW)
        if tidy_after:
            outbox.tidy(store, tidy_at)
    want = model(writes)
    rows = list(want.values())
    lim, blind, alert = NOW - 24 * HOUR, NOW - 19 * HOUR, NOW - 12 * HOUR

    sendable = [
        p for p in rows
        if p.timestamp_ms >= lim
        and ((p.status == PENDING and not p.first_attempt_ms)
             or (attempted(p) and p.first_attempt_ms > blind))
    ]  # fmt: skip
    assert ids(outbox.sendable(store, lim, blind, 1_000)) == ordered(sendable)
    never = [p for p in rows if p.timestamp_ms >= lim and p.status == PENDING]
    never = [p for p in never if not p.first_attempt_ms]
    assert ids(outbox.never_sent(store, lim, 1_000)) == ordered(never)
    for expired in (False, True):
        ranks = (PENDING, EXPIRED) if expired else (PENDING,)
        past = [p for p in rows if p.timestamp_ms < lim and p.status in ranks]
        past = [p for p in past if not p.first_attempt_ms]
        assert ids(outbox.past_limit(store, lim, expired, 1_000)) == ordered(past)
    due = {
        (p.customer_id, p.timestamp_ms // 60_000 * 60_000)
        for p in rows
        if attempted(p) and (p.first_attempt_ms <= blind or p.timestamp_ms < lim)
    }
    got = {(k.customer_id, k.minute_ms) for k in minutes.due_buckets(store, blind, lim, 1_000)}
    assert got == due

    outbox.tidy(store, tidy_at)  # what each cycle ends with, before the gauges are read
    waiting = [p for p in rows if p.status in (PENDING, ATTEMPTED, REDATED)]
    assert standing.backlog(store, alert) == standing.Backlog(
        len(waiting),
        min((p.timestamp_ms for p in waiting), default=0),
        sum(p.timestamp_ms < alert for p in waiting),
        sum(p.status == EXPIRED for p in rows),
        sum(p.status == REJECTED for p in rows),
    )


# -- (b) bounded by the open work, not the history --------------------------------------

HISTORY = 1_000_000
BOUND = 100_000  # rows a read may select: a few granules per open push, a tenth of history


def test_reads_of_open_work_select_the_open_pushes_not_the_history(tmp_path: Path) -> None:
    store = open_store(ClickHouseConfig(chdb_path=tmp_path / "chdb"))
    try:
        migrate(store)
        store.command(
            f"""INSERT INTO stripe_pushes (identifier, mode, meter, stripe_event_name,
                   customer_id, bucket_start, revision, value, status_rank, first_attempt_at,
                   updated_at, stripe_timestamp, sent_value)
                SELECT concat('h', lower(hex(SHA256(toString(number))))), 'per_event', 'm', 'm',
                       concat('c', toString(number % 100)),
                       fromUnixTimestamp64Milli({NOW} - intDiv(number, 1000) * 60000, 'UTC'),
                       0, 1, {SENT}, fromUnixTimestamp64Milli({NOW}, 'UTC'),
                       fromUnixTimestamp64Milli({NOW}, 'UTC'),
                       fromUnixTimestamp64Milli({NOW} - intDiv(number, 1000) * 60000, 'UTC'), 1
                FROM numbers({HISTORY})"""
        )
        store.command("OPTIMIZE TABLE stripe_pushes FINAL")
        lim, blind = NOW - 35 * 24 * HOUR, NOW - 19 * HOUR
        outbox.write(store, [push(1, PENDING), push(2, PENDING, ts_ms=lim - 1)], PENDING, NOW)
        outbox.write(store, [push(3, ATTEMPTED, NOW - 30 * HOUR)], ATTEMPTED, NOW)
        outbox.write(store, [push(4, SENT, NOW - HOUR)], SENT, NOW)
        store.command(f"SET max_rows_to_read = {BOUND}")
        try:
            assert ids(outbox.sendable(store, lim, blind, 100)) == ["p0001"]
            assert ids(outbox.never_sent(store, lim, 100)) == ["p0001"]
            assert ids(outbox.past_limit(store, lim, True, 100)) == ["p0002"]
            assert len(minutes.due_buckets(store, blind, lim, 100)) == 1
            assert standing.backlog(store, lim).pending == 3
            outbox.tidy(store, 0)
            assert standing.backlog(store, lim).pending == 3
            with pytest.raises(Exception, match=r"TOO_MANY_ROWS|[Ll]imit for rows"):
                # the read before migration 18: every push of the outbox, merged
                store.query(
                    f"""SELECT {COLUMNS} FROM stripe_pushes FINAL
                       WHERE status_rank = 1 AND toUnixTimestamp64Milli(first_attempt_at) = 0
                       ORDER BY bucket_start, identifier LIMIT 100"""
                )
        finally:
            store.command("SET max_rows_to_read = 0")
        named = store.query("SELECT status_rank, count() FROM stripe_open FINAL GROUP BY 1")
        counts = sorted((int(r), int(n)) for r, n in named)
        assert counts == [(PENDING, 2), (ATTEMPTED, 1), (SENT, 1)]
    finally:
        store.close()


# -- (c) crashes between the two tables -------------------------------------------------


class Killed(BaseException):
    """The process dies here (not an Exception: nothing on the way may catch it)."""


def kill_at(point: str) -> None:
    def hook(name: str) -> None:
        if name == point:
            raise Killed(name)

    crash_points.install(hook)


def test_a_crash_between_the_marks_and_their_names_neither_resends_nor_sticks(
    server: EmulatorServer, tmp_path: Path
) -> None:
    meters = [{**m, "stripe_value_format": "decimal"} for m in METERS]
    rig: Rig = open_rig(server, tmp_path, meters)
    try:
        truth: dict[tuple[str, str], Decimal] = {}
        now = rig.now_ms()
        sent = [per_event(rig, truth, "tokens", "cus_a", f"e{i}", "2", now) for i in range(3)]
        kill_at("after_settled_marks")
        try:
            with pytest.raises(Killed):
                rig.emitter().run_once()  # sends, writes the marks, dies before the names
        finally:
            crash_points.install()
        assert {s for s, _, _ in rig.statuses().values()} == {"sent"}
        stale = rig.store.query("SELECT status_rank FROM stripe_open FINAL")
        assert [int(r) for (r,) in stale] == [ATTEMPTED] * 3  # open here, sent in stripe_pushes
        emitter = rig.emitter()  # the restarted process
        drain(emitter)
        assert standing.backlog(rig.store, 0).pending == 0  # tidied: nothing stuck
        outbox.tidy(rig.store, 0)
        assert int(rig.store.query("SELECT count() FROM stripe_open")[0][0]) == 0
        # a re-formed range rewrites one intent of a sent push: its name is open again
        outbox.write(rig.store, sent[:1], PENDING, rig.now_ms())
        rig.jump(2 * 86400)  # past Stripe's 24 hours: a second send would bill again
        drain(emitter)
        assert rig.billed() == truth
        assert set(rig.stored_per_identifier().values()) == {1}
        assert standing.backlog(rig.store, 0).pending == 0
        # an intent whose push write never happened: a name without a push, skipped
        later = per_event(rig, truth, "tokens", "cus_a", "e9", "5", rig.now_ms())
        outbox._name(rig.store, [(later._replace(identifier="never-written"), PENDING, 0)])
        drain(emitter)
        assert rig.billed() == truth
        assert set(rig.stored_per_identifier().values()) == {1}
    finally:
        rig.store.close()


def test_the_migration_names_every_push_open_before_it(tmp_path: Path) -> None:
    store = open_store(ClickHouseConfig(chdb_path=tmp_path / "chdb"))
    try:
        _upto(store, 17)
        outbox._insert_pushes(
            store,
            [push(i, r) for i, r in enumerate(RANKS)],
            list(RANKS),
            NOW,
        )
        assert migrate(store) == [n for n, _, _ in MIGRATIONS if n > 17]
        named = store.query("SELECT identifier, status_rank FROM stripe_open ORDER BY 1")
        assert [(str(i), int(r)) for i, r in named] == [
            (f"p{i:04d}", r) for i, r in enumerate(RANKS) if r not in (SENT_V1, SENT, CANCELLED)
        ]
    finally:
        store.close()


def test_a_cycle_with_nothing_open_never_reads_the_outbox(
    server: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stripe_pushes' key is analysed part by part even for an empty set of names: an idle
    cycle asks stripe_open alone, so its cost does not follow the outbox's history."""
    rig: Rig = open_rig(server, tmp_path, METERS)
    try:
        truth: dict[tuple[str, str], Decimal] = {}
        per_event(rig, truth, "tokens", "cus_a", "e0", "2", rig.now_ms())
        emitter = rig.emitter()
        drain(emitter)
        asked: list[str] = []
        inner = rig.store.inner
        for name in ("query", "query_with"):
            real = getattr(inner, name)

            def recorded(sql: str, *a: Any, _real: Any = real, **k: Any) -> Any:
                asked.append(sql)
                return _real(sql, *a, **k)

            monkeypatch.setattr(inner, name, recorded)
        assert emitter.run_once() == 0
        assert asked and not [sql for sql in asked if "stripe_pushes" in sql]
        emitter.close()
    finally:
        rig.store.close()
