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


def test_ledger_question_ignores_each_candidates_own_range(store: ChdbBackend) -> None:
    store.command("TRUNCATE TABLE usage_events")
    store.command(
        """INSERT INTO usage_events (meter, customer_id, event_id, event_time, value, topic,
                                     partition, offset, record_time, ver)
           VALUES ('m', 'c', 'own', now64(3), 1, 't', 0, 5, now64(3), 1),
                  ('m', 'c', 'other', now64(3), 1, 't', 2, 9, now64(3), 1),
                  ('m', 'c', 'twice', now64(3), 1, 't', 4, 1, now64(3), 1),
                  ('m', 'c', 'twice', now64(3), 1, 't', 3, 1, now64(3), 1),
                  ('n', 'c', 'other', now64(3), 1, 't', 1, 1, now64(3), 1)"""
    )
    ids = ["own", "other", "twice", "never"]
    candidates = pa.table(
        [
            pa.array(range(4), pa.uint32()),
            pa.array(["m"] * 4),
            pa.array(ids),
            pa.array(["t"] * 4),
            pa.array([0] * 4, pa.uint32()),
            pa.array([0] * 4, pa.uint64()),
            pa.array([10] * 4, pa.uint64()),
        ],
        schema=CANDIDATE_SCHEMA,
    )
    # 'own' sits inside its range [0, 10) of partition 0 (a retried write): not a copy
    assert ledger_lookup(store)(candidates) == {1: 2, 2: 3}


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
