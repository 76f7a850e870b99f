"""Arrow tables as query inputs (chDB): the ledger question of a batch, and the per-event
push identifiers ClickHouse computes, which must equal the Python definition."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.classify.classifier import CANDIDATE_SCHEMA
from consumer.emitter.plan.identifiers import per_event_identifier
from consumer.records import DECIMAL, TIME_MS
from consumer.sinks.ledger import PER_EVENT_IDENTIFIER_SQL, ledger_lookup
from consumer.store.chdb import ChdbBackend
from consumer.store.migrations import migrate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbBackend]:
    backend = ChdbBackend(Path(tmp_path_factory.mktemp("inputs")) / "chdb", "usage")
    migrate(backend)
    yield backend
    backend.close()


def test_inputs_of_every_type_and_parameters_together(store: ChdbBackend) -> None:
    left = pa.table(
        {
            "k": pa.array(["a", "b"]),
            "v": pa.array([Decimal("1.000000001"), Decimal(-2)], DECIMAL),
            "t": pa.array([1_700_000_000_123, 0], TIME_MS),
            "m": pa.array([[("x", "1")], []], pa.map_(pa.string(), pa.string())),
        }
    )
    right = pa.table({"k": pa.array(["b"]), "n": pa.array([7], pa.uint32())})
    rows = store.query_with(
        """SELECT l.k, toString(l.v), toUnixTimestamp64Milli(l.t), l.m['x'], r.n, {p:String}
           FROM $left AS l LEFT JOIN $right AS r ON l.k = r.k ORDER BY l.k""",
        {"left": left, "right": right},
        {"p": "ok"},
    )
    assert rows == [("a", "1.000000001", 1_700_000_000_123, "1", 0, "ok"),
                    ("b", "-2", 0, "", 7, "ok")]  # fmt: skip
    with pytest.raises(ValueError, match="missing"):
        store.query_with("SELECT * FROM $nowhere", {})


ODD = ["cus_o'brien", 'say "hi"', "back\\slash", "tab\tnew\nline", "nul\x00", "\u2028\xa0\u00e9",
       "\U0001f600", "'", "", "\\'"]  # fmt: skip


def test_array_parameters_round_trip_any_string(store: ChdbBackend) -> None:
    """Array(String) and Array(Tuple(String, String)) parameters arrive as sent, whatever
    the strings hold (the run-path fuzz met a customer id with an apostrophe: every emitter
    cycle failed on the (meter, customer) pairs it asks about)."""
    pairs = [("m", s) for s in ODD] + [(s, "c") for s in ODD]
    rows = store.query(
        "SELECT {a:Array(String)}, {p:Array(Tuple(String, String))}", {"a": ODD, "p": pairs}
    )
    assert rows[0][0] == ODD
    assert [tuple(x) for x in rows[0][1]] == pairs


T = 1_790_000_000_000  # ms, a minute boundary
H = 6 * 3_600_000  # the dedup horizon these tests ask with
INCARNATION = "AAAAAAAAAAAAAAAAAAAAAQ"  # a topic id as Kafka spells them


def ledger_rows(
    store: ChdbBackend, rows: list[tuple[str, str, int, int, int]], topic_id: str = INCARNATION
) -> None:
    """(meter, event id, event time ms, partition, offset) into an empty ledger, written by
    topic t's incarnation `topic_id`."""
    store_rows = ", ".join(
        f"('{m}', 'c', '{e}', fromUnixTimestamp64Milli({t}, 'UTC'), 1, 't', {p}, {o}, "
        f"fromUnixTimestamp64Milli({t}, 'UTC'), 1, '{topic_id}')"
        for m, e, t, p, o in rows
    )
    store.command("TRUNCATE TABLE usage_events")
    store.command(
        f"""INSERT INTO usage_events (meter, customer_id, event_id, event_time, value, topic,
                                      partition, offset, record_time, ver, topic_id)
            VALUES {store_rows}"""
    )


def candidates_of(
    ids: list[str],
    times: list[int],
    meter: str = "m",
    topic_id: str = INCARNATION,
    own_unrecorded: bool = False,
) -> pa.Table:
    """Candidates of topic t's incarnation `topic_id`, their range [0, 10) of partition 0
    (opened before migration 25 with `own_unrecorded`)."""
    n = len(ids)
    return pa.table(
        [
            pa.array(range(n), pa.uint32()),
            pa.array([meter] * n),
            pa.array(ids),
            pa.array(times, pa.int64()),
            pa.array(["t"] * n),
            pa.array([topic_id] * n),
            pa.array([0] * n, pa.uint32()),
            pa.array([0] * n, pa.uint64()),
            pa.array([10] * n, pa.uint64()),
            pa.array([own_unrecorded] * n, pa.bool_()),
        ],
        schema=CANDIDATE_SCHEMA,
    )


def test_ledger_question_ignores_each_candidates_own_range(store: ChdbBackend) -> None:
    ledger_rows(
        store,
        [("m", "own", T, 0, 5), ("m", "other", T, 2, 9), ("m", "twice", T, 4, 1),
         ("m", "twice", T, 3, 1), ("n", "other", T, 1, 1)]
    )  # fmt: skip
    candidates = candidates_of(["own", "other", "twice", "never"], [T] * 4)
    # 'own' sits inside its range [0, 10) of partition 0 (a retried write): not a copy
    assert ledger_lookup(store, H)(candidates) == {1: 2, 2: 3}


def test_a_row_of_another_incarnation_inside_the_range_is_a_copy(store: ChdbBackend) -> None:
    """The topic was deleted and re-created: its old incarnation's row at the very position
    of the range's own is a copy (P2 is about this incarnation's writes only), and so is a
    row written before incarnations were recorded (migration 25's default)."""
    ledger_rows(store, [("m", "old", T, 0, 5)], topic_id="AAAAAAAAAAAAAAAAAAAAAg")
    store.command(
        f"""INSERT INTO usage_events (meter, customer_id, event_id, event_time, value, topic,
                                      partition, offset, record_time, ver)
            VALUES ('m', 'c', 'unrecorded', fromUnixTimestamp64Milli({T}, 'UTC'), 1, 't', 0, 6,
                    fromUnixTimestamp64Milli({T}, 'UTC'), 1)"""
    )
    candidates = candidates_of(["old", "unrecorded"], [T] * 2)
    assert ledger_lookup(store, H)(candidates) == {0: 0, 1: 0}
    # the incarnation that wrote it asks again (a retried range): its own row, not a copy
    assert (
        ledger_lookup(store, H)(candidates_of(["old"], [T], topic_id="AAAAAAAAAAAAAAAAAAAAAg"))
        == {}
    )
    # a range opened before migration 25, re-formed after it: an unrecorded row at its own
    # position is its crashed attempt's, not a copy; another incarnation's still is one
    legacy = candidates_of(["old", "unrecorded"], [T] * 2, own_unrecorded=True)
    assert ledger_lookup(store, H)(legacy) == {0: 0}


def test_a_copy_counts_within_the_horizon_of_its_event_time(store: ChdbBackend) -> None:
    """Re-stamped copies: exactly H apart is a duplicate, a millisecond more is not, on
    either side; a copy with the same event time is one however old."""
    ledger_rows(
        store,
        [("m", "early", T - H, 1, 1), ("m", "too-early", T - H - 1, 1, 2),
         ("m", "later", T + H, 1, 3), ("m", "too-late", T + H + 1, 1, 4),
         ("m", "ancient", T - 60 * 86_400_000, 1, 5)]
    )  # fmt: skip
    ids = ["early", "too-early", "later", "too-late", "ancient"]
    times = [T, T, T, T, T - 60 * 86_400_000]
    assert ledger_lookup(store, H)(candidates_of(ids, times)) == {0: 1, 2: 1, 4: 1}


def test_the_question_reads_the_horizon_not_the_history(store: ChdbBackend) -> None:
    """60 days of ledger, 10,000 rows an hour; a batch of this hour's ids may read at most
    the rows of its horizon (2 x 6 h of 1,440 h, with granule slack): ClickHouse refuses
    a read of more rows (max_rows_to_read), so a scan of the history fails the test."""
    hours = 60 * 24
    store.command("TRUNCATE TABLE usage_events")
    store.command(
        f"""INSERT INTO usage_events (meter, customer_id, event_id, event_time, value, topic,
                                      partition, offset, record_time, ver)
            SELECT 'm', 'c', toString(number),
                   fromUnixTimestamp64Milli({T} - intDiv(number, 10000) * 3600000, 'UTC'), 1,
                   't', 1, number, now64(3), 1
            FROM numbers({hours * 10_000})"""
    )
    store.command("OPTIMIZE TABLE usage_events FINAL")
    ids = [str(i) for i in range(0, 10_000, 7)] + ["new"]  # this hour's, and a new one
    candidates = candidates_of(ids, [T] * len(ids))
    store.command(f"SET max_rows_to_read = {20 * 10_000 + 100_000}")
    try:
        held = ledger_lookup(store, H)(candidates)
        assert len(held) == len(ids) - 1
        with pytest.raises(Exception, match=r"TOO_MANY_ROWS|[Ll]imit for rows"):
            # the same question with a horizon of the whole history: the limit bites
            ledger_lookup(store, hours * 3_600_000)(candidates)
    finally:
        store.command("SET max_rows_to_read = 0")


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=12) | st.text(alphabet="\x1e\x1fa", min_size=1),
            st.text(max_size=30) | st.text(alphabet="\x1e\x1fa"),
        ),
        max_size=8,
    )
)
def test_clickhouse_computes_the_python_per_event_identifier(
    store: ChdbBackend, pairs: list[tuple[str, str]]
) -> None:
    table = pa.table(
        {"name": pa.array([n for n, _ in pairs], pa.string()),
         "event_id": pa.array([e for _, e in pairs], pa.string())}
    )  # fmt: skip
    rows = store.query_with(f"SELECT {PER_EVENT_IDENTIFIER_SQL} FROM $t", {"t": table})
    assert [r[0] for r in rows] == [per_event_identifier(n, e) for n, e in pairs]
