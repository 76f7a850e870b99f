"""The columnar classifier equals the per-event model (tests/support/reference.py) on any range:
good, odd and broken messages, copies in and out of the range, lateness, cancels."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.classify import classifier as classify
from consumer.classify.classifier import CANDIDATE_SCHEMA, Classifier, Job
from consumer.classify.snapshot import Snapshot
from consumer.config import MeterConfig
from consumer.decode.reference import Decoder
from consumer.decode.schemas import SCHEMAS_DIR, LocalSchemaSource, load_schema, reader_schema
from consumer.decode.validate import Limits
from consumer.decode.wire import encode_confluent, frame_confluent
from consumer.producer import event_record
from consumer.records import RangeInput, Record
from tests.support import reference

T0 = 1_763_000_000_000
HOUR_MS = 3_600_000
METERS = {
    m.event_name: m
    for m in (
        MeterConfig(name="api_calls", event_name="api_call", allowed_lateness_seconds=3600),
        MeterConfig(
            name="tokens", event_name="tokens", allowed_lateness_seconds=60, max_value=Decimal(50)
        ),
    )
}
LIMITS = Limits()
V1 = load_schema(SCHEMAS_DIR / "usage_event.v1.avsc")
V2 = load_schema(SCHEMAS_DIR / "usage_event.v2.avsc")
V4 = reader_schema()

IDS = st.one_of(
    st.sampled_from(["a", "b", "c", "d"]),  # small: copies are common
    st.sampled_from(["", " ", " a", "\u00a0x", "\x1f", "é", "x" * 200, "x" * 201]),
    st.text(max_size=8),
)
VALUES = st.one_of(
    st.sampled_from([Decimal(0), Decimal(1), Decimal("-1"), Decimal(50), Decimal("50.000000001")]),
    st.decimals(-(10**6), 10**6, places=9, allow_nan=False, allow_infinity=False),
)


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes | None, int]:
    """(value, record timestamp) of one message."""
    kind = draw(st.sampled_from(["event"] * 8 + ["cancel", "broken", "none"]))
    record_ts = draw(st.sampled_from([T0, T0, T0 + 5 * HOUR_MS, 0, 2**62 + 1]))
    if kind == "none":
        return None, record_ts
    if kind == "broken":
        raw = draw(st.binary(max_size=12))
        return draw(st.sampled_from([raw, frame_confluent(2, raw), frame_confluent(77, raw)])), 0
    ts = T0 + draw(st.integers(-3 * HOUR_MS, 10 * 60_000))
    name = draw(st.sampled_from(["api_call", "api_call", "tokens", "nope"]))
    event_id = draw(IDS)
    cancels = draw(st.sampled_from(["a", event_id, ""])) if kind == "cancel" else ""
    rec: dict[str, Any] = event_record(
        event_id, name, draw(IDS), draw(VALUES), ts, {"r": draw(IDS)}, cancels=cancels
    )
    schema, schema_id = draw(st.sampled_from([(V1, 1), (V2, 2), (V4, 4)]))
    if schema_id == 1:
        rec.pop("properties")
    if schema_id != 4:
        rec.pop("cancels", None)
    return encode_confluent(rec, schema, schema_id), record_ts


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(messages(), max_size=30), min_size=1, max_size=3),
    st.dictionaries(st.sampled_from(["api_calls", "tokens"]), st.integers(-HOUR_MS, HOUR_MS)),
    st.dictionaries(
        st.tuples(st.sampled_from(["api_calls", "tokens"]), st.sampled_from(["a", "c", "e"])),
        st.sampled_from([3, 4]),
    ),
)
def test_columnar_classification_equals_the_model(
    batch: list[list[tuple[bytes | None, int]]],
    marks: dict[str, int],
    held: dict[tuple[str, str], int],
) -> None:
    """A batch of one to three ranges (partitions 0, 1, 2), classified together."""
    snapshot = Snapshot({m: T0 + d for m, d in marks.items()}, "c", T0)
    ranges = []
    for p, msgs in enumerate(batch):
        records = [Record("t", p, 10 + i, None, v, ts) for i, (v, ts) in enumerate(msgs)]
        ranges.append((records, snapshot))
    decoder = Decoder(mode="confluent", source=LocalSchemaSource(), reader=reader_schema())

    def ledger(candidates: Any) -> dict[int, int]:
        assert candidates.schema == CANDIDATE_SCHEMA
        return {
            r["ci"]: held[(r["meter"], r["event_id"])]
            for r in candidates.to_pylist()
            if (r["meter"], r["event_id"]) in held
        }

    jobs = [Job(RangeInput.of_records(r), 10, 10 + len(r), snap) for r, snap in ranges]
    got = Classifier(decoder, METERS, LIMITS).classify_all(jobs, ledger)
    want = reference.classify_batch(decoder, METERS, LIMITS, ranges, held)
    assert [reference.summary(g) for g in got] == want


def test_several_ranges_share_one_question_and_keep_their_own_outcomes() -> None:
    decoder = Decoder(mode="confluent", source=LocalSchemaSource(), reader=reader_schema())
    c = Classifier(decoder, METERS, LIMITS)

    def event(eid: str) -> bytes:
        return encode_confluent(event_record(eid, "api_call", "cus", Decimal(1), T0), V4, 4)

    ranges = [
        RangeInput.of_records([Record("t", p, o, None, event(e), T0) for o, e in enumerate(ids)])
        for p, ids in ((0, ["a", "b", "a"]), (1, ["a", "c"]))
    ]
    asked: list[list[tuple[str, int]]] = []

    def ledger(candidates: Any) -> dict[int, int]:
        rows = candidates.to_pylist()
        asked.append([(r["event_id"], r["partition"]) for r in rows])
        return {r["ci"]: 0 for r in rows if r["event_id"] == "c"}  # c was written by p0

    snap = Snapshot({}, "c", T0)
    jobs = [Job(r, 0, len(r), snap) for r in ranges]
    first, second = c.classify_all(jobs, ledger)
    assert asked == [[("a", 0), ("b", 0), ("a", 1), ("c", 1)]]
    assert [a.event.event_id for a in first.accepted] == ["a", "b"]
    assert first.duplicates == {"api_calls": 1} and first.cross_partition == 0
    assert [a.event.event_id for a in second.accepted] == []  # p0 accepted a: one bill
    assert second.duplicates == {"api_calls": 2} and second.cross_partition == 2


def test_a_key_collision_across_ranges_never_drops_an_event() -> None:
    """A key another range holds only narrows the search: an event is a copy of an earlier
    range's only when the (meter, event id) is the same."""
    decoder = Decoder(mode="confluent", source=LocalSchemaSource(), reader=reader_schema())
    c = Classifier(decoder, METERS, LIMITS)
    body = encode_confluent(event_record("b", "api_call", "cus", Decimal(1), T0), V4, 4)
    ev = c.ranges.decode(RangeInput.of_records([Record("t", 1, 0, None, body, T0)]))
    d = classify._split_copies(ev)
    colliding = np.ones(len(ev.kind), bool)  # as if another range's key equalled "b"'s
    for claimed, want in (({("api_calls", "a"): 0}, -1), ({("api_calls", "b"): 0}, 0)):
        found = np.full(len(d.first), -1, np.int64)
        classify._claimed_earlier(ev, d, found, claimed, colliding)
        assert found.tolist() == [want]
