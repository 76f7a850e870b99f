"""The rollup thread: window jobs run in order behind the commits, and a job a crash left
pending is found and run on the next assignment, from the ledger rows alone."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from consumer.clock import SystemClock
from consumer.metrics import Metrics
from consumer.sinks.ledger import accepted_table, batch_id, cancels_of
from consumer.sinks.rollup import Rollup, RollupFailed, WindowJob
from consumer.store.backend import Backend, StoreUnavailable
from consumer.store.chdb import ChdbBackend
from consumer.store.migrations import migrate
from tests.integration.test_windows_clickhouse import (
    BASE_MS,
    Cancel,
    Copy,
    Ev,
    minutely,
    ranges_for,
    reference,
)
from tests.support.writes import write_effects

pytestmark = pytest.mark.integration
HORIZON_MS = 6 * 3_600_000


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChdbBackend]:
    backend = ChdbBackend(tmp_path / "chdb", "usage")
    migrate(backend)
    yield backend
    backend.close()


def rollup(store: Backend) -> Rollup:
    return Rollup(store, "g", "t.rollup", SystemClock(), Metrics(), horizon_ms=HORIZON_MS)


def batch(store: Backend, copies: list[Copy], cancels: Sequence[Cancel] = ()) -> WindowJob:
    ranges = ranges_for(copies, "t.rollup", cancels)
    token = batch_id(ranges)
    write_effects(store, token, ranges, BASE_MS)
    spans = [(r.partition, r.start, r.end) for r in ranges]
    return WindowJob.of_batch(token, spans, accepted_table(ranges), cancels_of(ranges))


EVENTS = [
    Ev("api_calls", "cus_a", "e-1", BASE_MS + 1_000, Decimal(2)),
    Ev("api_calls", "cus_a", "e-2", BASE_MS + 2_000, Decimal(3)),
    Ev("storage_gb", "cus_b", "e-3", BASE_MS + 61_000, Decimal("1.5")),
    Ev("api_calls", "cus_a", "e-4", BASE_MS + 121_000, Decimal(7)),
]


def test_jobs_run_in_order_and_are_marked_done(store: Backend) -> None:
    r = rollup(store)
    first = batch(store, [Copy(EVENTS[0], 0, 0), Copy(EVENTS[2], 1, 0)])
    second = batch(store, [Copy(EVENTS[1], 0, 0), Copy(EVENTS[3], 2, 0)])
    for job in (first, second):
        r.record(job)
        r.submit(job)
    r.close()
    assert minutely(store) == reference(EVENTS, "minute")
    assert rollup(store).recover(dict.fromkeys([0, 1, 2])) == 0  # nothing left pending
    assert r.visible == {0: 1, 1: 1, 2: 1}  # what analysts see, by range end


def test_a_job_left_pending_by_a_crash_runs_on_the_next_assignment(store: Backend) -> None:
    cancel = Cancel("api_calls", "cus_a", "e-2")
    done = batch(store, [Copy(EVENTS[0], 0, 0), Copy(EVENTS[1], 0, 0)])
    before = rollup(store)
    before.record(done)
    before.submit(done)
    before.close()
    crashed = batch(store, [Copy(EVENTS[2], 1, 0), Copy(EVENTS[3], 2, 0)], [cancel])
    rollup(store).record(crashed)  # ... and the process died before running it
    assert minutely(store) == reference(EVENTS[:2], "minute")
    after = rollup(store)
    assert after.recover({5: 40}) == 0  # names none of these partitions
    assert after.visible == {5: 40}  # nothing pending: whole up to where it resumes
    assert after.recover({2: 1}) == 1  # found by any partition it names, from the ledger
    assert after.visible == {5: 40}  # ... and visible only once it ran
    after.close()
    assert after.visible == {5: 40, 1: 1, 2: 1, 9: 1}
    assert minutely(store) == reference(EVENTS, "minute", cancels=[cancel])
    assert rollup(store).recover(dict.fromkeys([0, 1, 2, 9])) == 0


class Failing:
    """The store, failing the window inserts `transient` times, then with a bug if told."""

    def __init__(self, inner: Backend, transient: int, bug: bool = False) -> None:
        self.inner, self.transient, self.bug = inner, transient, bug

    def command_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> None:
        if "INSERT INTO usage_windows" in sql:
            if self.bug:
                raise KeyError("a bug")
            if self.transient:
                self.transient -= 1
                raise StoreUnavailable("injected: ClickHouse unreachable")
        self.inner.command_with(sql, inputs, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_transient_failures_are_retried_and_bugs_stop_the_consumer(store: Backend) -> None:
    job = batch(store, [Copy(e, 0, 0) for e in EVENTS])
    flaky = Rollup(
        Failing(store, transient=2),
        "g",
        "t.rollup",
        SystemClock(),
        Metrics(),
        horizon_ms=HORIZON_MS,
    )
    flaky.record(job)
    flaky.submit(job)
    flaky.close()
    assert minutely(store) == reference(EVENTS, "minute")
    broken = Rollup(
        Failing(store, 0, bug=True),
        "g",
        "t.rollup",
        SystemClock(),
        Metrics(),
        horizon_ms=HORIZON_MS,
    )
    broken.submit(job)
    with pytest.raises(RollupFailed, match="a bug"):
        broken.wait()
    with pytest.raises(RollupFailed):
        broken.submit(job)
