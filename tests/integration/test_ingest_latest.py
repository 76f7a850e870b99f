"""Each partition's latest ingest state (migration 15): the row P4's order picks, kept in a
table of one row a partition, so assignment reads stay flat as the history grows."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.intent.state import DONE, INTENT, RangeState, load_states, write_states
from consumer.store.chdb import ChdbBackend
from consumer.store.migrations import migrate
from tests.integration.test_migrations import _upto

pytestmark = pytest.mark.integration

# (partition, range_start, rank, epoch, written_at ms)
Row = tuple[int, int, int, int, int]
ROWS = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.sampled_from([0, 100, 200, 2**40, 2**62, 2**63 - 8]),
        st.sampled_from([INTENT, DONE]),
        st.sampled_from([1, 2**32, 2**63, 2**64 - 1]),
        st.integers(1_700_000_000_000, 1_700_000_000_009),
    ),
    min_size=1,
    max_size=25,
)


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("latest")) / "chdb"  # one chDB path a process


@pytest.fixture(scope="module")
def store(path: Path) -> Iterator[ChdbBackend]:
    backend = ChdbBackend(path, "usage")
    migrate(backend)
    yield backend
    backend.close()


def _write(store: ChdbBackend, rows: list[Row], batches: int) -> None:
    """The rows in their order, split into `batches` inserts (parts the merge sees)."""
    cuts = sorted({0, len(rows), *range(1, len(rows), max(1, len(rows) // batches))})
    for a, b in itertools.pairwise(cuts):
        for p, start, rank, epoch, at in rows[a:b]:
            state = RangeState(
                p, start, start + 7, rank, epoch % 97, f"{start}/{rank}/{epoch}/{at}"
            )
            write_states(store, "g", "t", epoch, at, [state])


def _expected(rows: list[Row]) -> dict[int, str]:
    """P4's order in plain Python: the greatest (start, rank, epoch, written at)."""
    best: dict[int, Row] = {}
    for r in rows:
        if r[0] not in best or r[1:] > best[r[0]][1:]:
            best[r[0]] = r
    return {p: f"{s}/{k}/{e}/{t}" for p, (_, s, k, e, t) in best.items()}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ROWS, st.integers(1, 4))
def test_the_latest_row_is_the_one_p4_orders_first(
    store: ChdbBackend, rows: list[Row], batches: int
) -> None:
    store.command("TRUNCATE TABLE ingest_state")
    store.command("TRUNCATE TABLE ingest_latest")
    _write(store, rows, batches)
    got = {p: s.snapshot for p, s in load_states(store, "g", "t", [0, 1, 2]).items()}
    assert got == _expected(rows)
    store.command("OPTIMIZE TABLE ingest_latest FINAL")  # what the merge keeps agrees
    (n,) = store.query("SELECT count() FROM ingest_latest")[0]
    assert int(n) == len(got)
    got = {p: s.snapshot for p, s in load_states(store, "g", "t", [0, 1, 2]).items()}
    assert got == _expected(rows)


def test_the_migration_carries_the_state_written_before_it(path: Path, store: ChdbBackend) -> None:
    older = ChdbBackend(path, "before_15")
    try:
        _upto(older, 14)
        rng = random.Random(15)
        rows = [
            (rng.randrange(3), rng.randrange(5) * 100, rng.choice([INTENT, DONE]),
             rng.randrange(3), 1_700_000_000_000 + rng.randrange(4))
            for _ in range(200)
        ]  # fmt: skip
        _write(older, rows, 5)
        assert 15 in migrate(older)
        got = {p: s.snapshot for p, s in load_states(older, "g", "t", [0, 1, 2]).items()}
        assert got == _expected(rows)
    finally:
        older.close()  # its connections too: the embedded server must not outlive the module


def test_assignment_reads_one_row_a_partition_not_the_history(store: ChdbBackend) -> None:
    """Two million rows of history: the read is held to a thousand rows by ClickHouse's
    max_rows_to_read, which the same question asked of `ingest_state` exceeds. (The LIFO
    connection pool runs these statements on one chDB connection, the SET's.)"""
    store.command("TRUNCATE TABLE ingest_state")
    store.command("TRUNCATE TABLE ingest_latest")
    store.command(
        """INSERT INTO ingest_state (group_id, topic, partition, range_start, range_end,
                                     state_rank, epoch, attempt, snapshot, written_at)
           SELECT 'g', 't', number % 4, intDiv(number, 8) * 100, intDiv(number, 8) * 100 + 100,
                  1 + intDiv(number % 8, 4), 7, 1, '', now64(3)
           FROM numbers(2000000)"""
    )
    # Months of small inserts, as the background merges leave them: one row a partition.
    store.command("OPTIMIZE TABLE ingest_latest FINAL")
    store.command("SET max_rows_to_read = 1000")
    try:
        states = load_states(store, "g", "t", [0, 1, 2, 3])
        assert {p: (s.range_start, s.rank) for p, s in states.items()} == {
            p: (24_999_900, DONE) for p in range(4)
        }
        with pytest.raises(Exception, match=r"TOO_MANY_ROWS|[Ll]imit for rows"):
            store.query("SELECT max(range_start) FROM ingest_state WHERE group_id = 'g'")
    finally:
        store.command("SET max_rows_to_read = 0")
