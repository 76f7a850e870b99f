"""Classify stage with a real decoder: accepted | duplicate | late | invalid, deterministic."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.classify.classifier import CANDIDATE_SCHEMA, Classified, Classifier
from consumer.classify.snapshot import Snapshot
from consumer.config import MeterConfig
from consumer.decode.reference import Decoder
from consumer.decode.schemas import LocalSchemaSource, reader_schema
from consumer.decode.validate import Limits
from consumer.decode.wire import encode_confluent, frame_confluent
from consumer.producer import CURRENT_SCHEMA_ID, event_record, message_key
from consumer.records import Record
from consumer.sinks.horizon import spans

T0 = 1_763_000_000_000
HOUR_MS = 3_600_000
API = MeterConfig(name="api_calls", event_name="api_call", allowed_lateness_seconds=3600)
TOKENS = MeterConfig(name="tokens", event_name="tokens", allowed_lateness_seconds=600)
METERS = {m.event_name: m for m in (API, TOKENS)}
SNAPSHOT = Snapshot(watermarks={}, config_hash="cfg", stamp_ms=T0)
SOURCE = LocalSchemaSource()


def classifier() -> Classifier:
    decoder = Decoder(mode="confluent", source=SOURCE, reader=reader_schema())
    return Classifier(decoder=decoder, meters=METERS, limits=Limits())


def payload(
    event_id: str,
    ts: int = T0,
    *,
    name: str = "api_call",
    customer: str = "cus_1",
    value: str = "1",
    cancels: str = "",
) -> bytes:
    rec = event_record(event_id, name, customer, Decimal(value), ts, cancels=cancels)
    return encode_confluent(rec, reader_schema(), CURRENT_SCHEMA_ID)


class Stream:
    """Builds consecutive records of one partition."""

    def __init__(self, topic: str = "usage.events", partition: int = 0, start: int = 0) -> None:
        self.topic, self.partition, self.next = topic, partition, start
        self.records: list[Record] = []

    def raw(self, value: bytes | None, record_ts: int = T0, key: bytes | None = None) -> Record:
        rec = Record(self.topic, self.partition, self.next, key, value, record_ts)
        self.next += 1
        self.records.append(rec)
        return rec

    def event(
        self,
        event_id: str,
        ts: int = T0,
        *,
        name: str = "api_call",
        value: str = "1",
        customer: str = "cus_1",
        record_ts: int | None = None,
        cancels: str = "",
    ) -> Record:
        data = payload(event_id, ts, name=name, customer=customer, value=value, cancels=cancels)
        return self.raw(data, T0 if record_ts is None else record_ts, message_key(name, event_id))


@dataclass
class FakeLedger:
    """(meter, ids) -> the ids it holds with their copy's partition; remembers every question."""

    held: set[tuple[str, str]] = field(default_factory=set)
    calls: list[tuple[str, list[str]]] = field(default_factory=list)  # (meter, ids) asked
    partition: int = 0  # where the held copies came from
    questions: int = 0

    def __call__(self, candidates: pa.Table) -> dict[int, int]:
        assert candidates.schema == CANDIDATE_SCHEMA
        self.questions += 1
        rows = candidates.to_pylist()
        by_meter: dict[str, list[str]] = {}
        for r in rows:
            by_meter.setdefault(r["meter"], []).append(r["event_id"])
        self.calls += sorted((m, sorted(ids)) for m, ids in by_meter.items())
        return {r["ci"]: self.partition for r in rows if (r["meter"], r["event_id"]) in self.held}


def ids(out: Classified) -> list[str]:
    return [a.event.event_id for a in out.accepted]


# --- invalid ---------------------------------------------------------------------------


def test_undecodable_and_invalid_messages_are_dead_letters_with_reasons() -> None:
    s = Stream()
    empty = s.raw(b"")
    none = s.raw(None)
    bad_magic = s.raw(b"\x01\x00\x00\x00\x02garbage")
    unknown_schema = s.raw(frame_confluent(99, b"\x00"))
    truncated = s.raw(payload("e-1")[:-3])
    trailing = s.raw(payload("e-2") + b"\x00")
    unknown_meter = s.event("e-3", name="nope")
    future = s.event("e-4", ts=T0 + 300_001)
    good = s.event("e-5")
    out = classifier().classify(s.records, SNAPSHOT, FakeLedger())
    reasons = {d.record.offset: d.reason for d in out.invalid}
    assert reasons == {
        empty.offset: "empty",
        none.offset: "empty",
        bad_magic.offset: "bad_magic",
        unknown_schema.offset: "unknown_schema_id",
        truncated.offset: "avro_decode_error",
        trailing.offset: "trailing_bytes",
        unknown_meter.offset: "unknown_meter",
        future.offset: "timestamp_in_future",
    }
    assert all(d.detail for d in out.invalid)
    assert [d.record for d in out.invalid] == s.records[:-1]  # original bytes are kept
    assert [a.record for a in out.accepted] == [good]
    assert out.duplicates == {} and out.late == []
    # The intent records the ids the headers name, read without decoding (P1, P7).
    named = classifier().decoder.named_schema_ids(r.value for r in s.records)
    assert CURRENT_SCHEMA_ID in named
    assert 99 in named and named == sorted(set(named))  # the unknown id is named too


def test_cancels_are_neither_usage_nor_deduplicated_nor_late() -> None:
    s = Stream()
    s.event("e-1")
    s.event("c-1", cancels="e-1")
    s.event("c-1", cancels="e-1")  # a repeated cancel converges in its table (sink.py)
    s.event("c-2", ts=T0 - 2 * HOUR_MS, cancels="e-0")  # older than lateness: still applies
    s.event("c-3", cancels="c-3")
    ledger = FakeLedger(held={("api_calls", "c-1")})  # a cancel never meets the ledger
    out = classifier().classify(s.records, SNAPSHOT, ledger)
    assert ids(out) == ["e-1"]
    assert [(c.event.event_id, c.event.cancels) for c in out.cancels] == [
        ("c-1", "e-1"), ("c-1", "e-1"), ("c-2", "e-0"),
    ]  # fmt: skip
    assert [d.reason for d in out.invalid] == ["cancels_itself"]
    assert out.duplicates == {} and out.late == []
    assert ledger.calls == [("api_calls", ["e-1"])]
    assert out.watermarks_after == {"api_calls": T0}  # cancels do not move the watermark


def test_invalid_first_copy_does_not_shadow_a_valid_later_copy() -> None:
    s = Stream()
    s.event("e-1", ts=T0 + 10 * 60_000)  # future-dated copy: dead letter
    ok = s.event("e-1")
    out = classifier().classify(s.records, SNAPSHOT, FakeLedger())
    assert [d.reason for d in out.invalid] == ["timestamp_in_future"]
    assert [a.record for a in out.accepted] == [ok]
    assert out.duplicates == {}


# --- duplicates ------------------------------------------------------------------------


def test_in_range_duplicates_first_occurrence_by_offset_wins() -> None:
    s = Stream(start=100)
    first = s.event("e-1", value="1")
    s.event("e-2", value="2")
    s.event("e-1", value="3")  # same id, different body: still a duplicate
    s.event("e-1", name="tokens", value="4")  # same id, other meter: a different event
    s.event("e-2", value="2")
    out = classifier().classify(s.records, SNAPSHOT, FakeLedger())
    assert [(a.meter.name, a.record.offset) for a in out.accepted] == [
        ("api_calls", 100),
        ("api_calls", 101),
        ("tokens", 103),
    ]
    assert out.accepted[0].record is first and out.accepted[0].event.value == Decimal(1)
    assert out.duplicates == {"api_calls": 2}


def test_ids_the_ledger_holds_are_duplicates() -> None:
    s = Stream()
    s.event("old-1")
    s.event("new-1")
    s.event("old-2", name="tokens")
    ledger = FakeLedger(held={("api_calls", "old-1"), ("tokens", "old-2")})
    out = classifier().classify(s.records, SNAPSHOT, ledger)
    assert ids(out) == ["new-1"]
    assert out.duplicates == {"api_calls": 1, "tokens": 1}
    # One batched question about every id of the range, whatever its meter.
    assert ledger.calls == [("api_calls", ["new-1", "old-1"]), ("tokens", ["old-2"])]
    assert ledger.questions == 1
    assert out.cross_partition == 0


def test_a_range_opened_before_migration_27_says_its_own_rows_may_be_unrecorded() -> None:
    """Its intent's snapshot has no `incarnated` (an earlier version wrote it), and a
    re-form keeps that snapshot: its candidates tell the ledger question that rows at its
    own positions reading '(unrecorded)' are its own crashed attempt's (P2)."""
    legacy = '{"config_hash": "cfg", "schema_ids": [], "stamp_ms": 0, "watermarks": {}}'
    asked: list[list[bool]] = []

    def ledger(candidates: pa.Table) -> dict[int, int]:
        asked.append(candidates.column("own_unrecorded").to_pylist())
        return {}

    for snapshot in (Snapshot.from_json(legacy), Snapshot.from_json(SNAPSHOT.to_json())):
        s = Stream()
        s.event("e-1")
        classifier().classify(s.records, snapshot, ledger)
    assert asked == [[True], [False]]


def test_a_copy_another_partition_wrote_is_a_duplicate() -> None:
    """Another partition wrote it (a producer not keying by id), maybe re-stamped so its
    ledger identity differs: the dedup key is (meter, event id) all the same."""
    s = Stream()
    s.event("e-1")
    s.event("e-2")
    ledger = FakeLedger(held={("api_calls", "e-1")}, partition=7)
    out = classifier().classify(s.records, SNAPSHOT, ledger)
    assert ids(out) == ["e-2"]
    assert out.duplicates == {"api_calls": 1}
    assert out.cross_partition == 1


def test_the_minutes_of_held_events_are_named_for_settling() -> None:
    """A held event's own row may be in the ledger from an earlier attempt of this range
    (sinks/copies.py): its meter and minute are named, and only those."""
    s = Stream()
    s.event("e-1", ts=T0 - 125_000)
    s.event("e-2", ts=T0 - 3_000)
    s.event("e-3", name="tokens", ts=T0 - 61_000)
    s.event("e-1", ts=T0 - 1_000)  # an in-range copy: never written, names nothing
    ledger = FakeLedger(held={("api_calls", "e-1"), ("tokens", "e-3")}, partition=3)
    out = classifier().classify(s.records, SNAPSHOT, ledger)
    assert ids(out) == ["e-2"]
    assert out.held_minutes == {
        ("api_calls", (T0 - 125_000) // 60_000 * 60),
        ("tokens", (T0 - 61_000) // 60_000 * 60),
    }


def test_ids_the_ledger_does_not_hold_are_accepted_and_asked_once() -> None:
    s = Stream()
    s.event("fp-1")
    s.event("fp-2")
    s.event("fp-1")  # in-range copy: one lookup id, one duplicate
    s.event("dup")
    ledger = FakeLedger(held={("api_calls", "dup")})
    out = classifier().classify(s.records, SNAPSHOT, ledger)
    assert ids(out) == ["fp-1", "fp-2"]
    assert out.duplicates == {"api_calls": 2}
    assert ledger.calls == [("api_calls", ["dup", "fp-1", "fp-2"])]  # sorted, distinct


def test_the_ledger_question_is_per_meter() -> None:
    s = Stream()
    s.event("x", name="tokens")
    ledger = FakeLedger(held={("api_calls", "x")})
    out = classifier().classify(s.records, SNAPSHOT, ledger)
    assert ids(out) == ["x"]
    assert out.duplicates == {}


# --- late ------------------------------------------------------------------------------


def test_late_beyond_allowed_lateness_versus_snapshot_watermark() -> None:
    mark = T0
    snap = Snapshot(watermarks={"api_calls": mark, "tokens": mark}, config_hash="c", stamp_ms=0)
    lateness = API.allowed_lateness_seconds * 1000
    s = Stream()
    on_edge = s.event("edge", ts=mark - lateness)
    late = s.event("late", ts=mark - lateness - 1)
    tok_late = s.event("tl", name="tokens", ts=mark - TOKENS.allowed_lateness_seconds * 1000 - 1)
    out = classifier().classify(s.records, snap, FakeLedger())
    assert [a.record for a in out.accepted] == [on_edge]
    assert [(x.record, x.meter.name, x.watermark_ms) for x in out.late] == [
        (late, "api_calls", mark),
        (tok_late, "tokens", mark),
    ]
    assert out.duplicates == {}
    assert out.invalid == []


def test_watermark_advances_within_the_range() -> None:
    s = Stream()
    s.event("a", ts=T0 - 3 * HOUR_MS)
    s.event("b", ts=T0)
    late = s.event("c", ts=T0 - 3 * HOUR_MS)  # now behind b by more than an hour
    out = classifier().classify(s.records, SNAPSHOT, FakeLedger())
    assert ids(out) == ["a", "b"]
    assert [(x.record, x.watermark_ms) for x in out.late] == [(late, T0)]
    assert out.watermarks_after == {"api_calls": T0}


def test_late_event_the_ledger_holds_is_a_duplicate_not_late() -> None:
    snap = Snapshot(watermarks={"api_calls": T0}, config_hash="c", stamp_ms=0)
    s = Stream()
    s.event("seen", ts=T0 - 2 * HOUR_MS)
    unseen = s.event("unseen", ts=T0 - 2 * HOUR_MS)
    ledger = FakeLedger(held={("api_calls", "seen")})
    out = classifier().classify(s.records, snap, ledger)
    assert len(out.accepted) == 0
    assert [x.record for x in out.late] == [unseen]
    assert out.duplicates == {"api_calls": 1}
    # Late ids are checked against the ledger even without a filter positive.
    assert ledger.calls == [("api_calls", ["seen", "unseen"])]
    assert out.cross_partition == 0  # the ledger's copy came from this very partition


def test_late_copies_in_range_are_one_late_event_and_duplicates() -> None:
    snap = Snapshot(watermarks={"api_calls": T0}, config_hash="c", stamp_ms=0)
    s = Stream()
    first = s.event("x", ts=T0 - 2 * HOUR_MS)
    s.event("x", ts=T0 - 2 * HOUR_MS)
    out = classifier().classify(s.records, snap, FakeLedger())
    assert [x.record for x in out.late] == [first]
    assert out.duplicates == {"api_calls": 1}


def test_watermarks_after_and_snapshot_is_not_mutated() -> None:
    snap = Snapshot(watermarks={"api_calls": T0, "other": 5}, config_hash="c", stamp_ms=0)
    s = Stream()
    s.event("a", ts=T0 - 1000)  # behind: does not move the mark
    s.event("b", ts=T0 + 5000)
    s.event("c", name="tokens", ts=T0 + 7)
    s.event("d", ts=T0 + 6000, record_ts=T0 - HOUR_MS)  # invalid (future): ignored
    out = classifier().classify(s.records, snap, FakeLedger())
    assert out.watermarks_after == {"api_calls": T0 + 5000, "tokens": T0 + 7, "other": 5}
    assert snap.watermarks == {"api_calls": T0, "other": 5}
    assert Snapshot.from_json(snap.to_json()) == snap


def test_empty_range() -> None:
    snap = Snapshot(watermarks={"api_calls": T0}, config_hash="c", stamp_ms=0)
    out = classifier().classify([], snap, FakeLedger())
    assert out == Classified(watermarks_after={"api_calls": T0})


def test_lookup_failure_propagates_instead_of_dead_lettering() -> None:
    def broken(candidates: pa.Table) -> dict[int, int]:
        raise ConnectionError("ledger unavailable")

    s = Stream()
    s.event("e")
    with pytest.raises(ConnectionError):
        classifier().classify(s.records, SNAPSHOT, broken)


# --- properties ------------------------------------------------------------------------

EVENT_IDS = st.text("abcxyz0", min_size=1, max_size=3)
NAMES = st.sampled_from(["api_call", "tokens"])


@st.composite
def streams(draw: st.DrawFn) -> list[tuple[str, str, int, str]]:
    """Distinct events, each copied 1-4 times, shuffled."""
    keys = draw(st.lists(st.tuples(NAMES, EVENT_IDS), unique=True, max_size=25))
    copies: list[tuple[str, str, int, str]] = []
    for name, eid in keys:
        lateness_ms = METERS[name].allowed_lateness_seconds * 1000
        ts = T0 - draw(st.integers(0, lateness_ms))
        value = str(draw(st.decimals(0, 10**6, places=3, allow_nan=False)))
        copies += [(name, eid, ts, value)] * draw(st.integers(1, 4))
    return list(draw(st.permutations(copies)))


@settings(max_examples=150, deadline=None)
@given(streams())
def test_first_occurrence_accepted_and_every_other_copy_duplicate(
    copies: list[tuple[str, str, int, str]],
) -> None:
    s = Stream(start=7)
    for name, eid, ts, value in copies:
        s.event(eid, ts, name=name, value=value)
    c = classifier()
    ledger = FakeLedger()
    out = c.classify(s.records, SNAPSHOT, ledger)

    first: dict[tuple[str, str], Record] = {}
    for rec, (name, eid, _, _) in zip(s.records, copies, strict=True):
        first.setdefault((METERS[name].name, eid), rec)
    assert [a.record for a in out.accepted] == sorted(first.values(), key=lambda r: r.offset)
    for a in out.accepted:
        assert first[(a.meter.name, a.event.event_id)] is a.record
    assert out.late == [] and out.invalid == []
    per_meter = Counter(METERS[name].name for name, *_ in copies)
    kept = Counter(m for m, _ in first)
    assert out.duplicates == {
        m: per_meter[m] - kept[m] for m in per_meter if per_meter[m] > kept[m]
    }
    assert sum(out.duplicates.values()) + len(out.accepted) == len(copies)

    # P1: the same records with the same snapshot classify identically.
    again = c.classify(list(s.records), SNAPSHOT, FakeLedger())
    assert again == out
    fresh = classifier().classify(s.records, SNAPSHOT, FakeLedger())
    assert fresh == out


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(NAMES, EVENT_IDS, st.integers(-4 * HOUR_MS, HOUR_MS)), max_size=30),
    st.sets(st.tuples(st.sampled_from(["api_calls", "tokens"]), EVENT_IDS)),
    st.dictionaries(st.sampled_from(["api_calls", "tokens"]), st.integers(-HOUR_MS, HOUR_MS)),
)
def test_every_record_gets_exactly_one_outcome_deterministically(
    events: list[tuple[str, str, int]],
    held: set[tuple[str, str]],
    marks: dict[str, int],
) -> None:
    snap = Snapshot({m: T0 + d for m, d in marks.items()}, "c", T0)
    s = Stream()
    for name, eid, dt in events:
        s.event(eid, T0 + dt, name=name)

    def run() -> Classified:
        return classifier().classify(s.records, snap, FakeLedger(held=set(held)))

    out = run()
    n_dup = sum(out.duplicates.values())
    assert len(out.accepted) + len(out.late) + len(out.invalid) + n_dup == len(s.records)
    outcome_offsets = [a.record.offset for a in out.accepted] + [x.record.offset for x in out.late]
    assert len(set(outcome_offsets)) == len(outcome_offsets)
    keys = [(a.meter.name, a.event.event_id) for a in out.accepted]
    keys += [(x.meter.name, x.event.event_id) for x in out.late]
    assert len(set(keys)) == len(keys)
    assert not set(keys) & held  # nothing the ledger holds is written or reported late
    for x in out.late:
        assert x.event.timestamp_ms < x.watermark_ms - x.meter.allowed_lateness_seconds * 1000
    assert out == run()


# --- the dedup horizon's spans ---------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(10**9), 10**9), min_size=1, max_size=60), st.integers(0, 10**7))
def test_spans_cover_every_horizon_disjointly_and_stay_few(times: list[int], h: int) -> None:
    got = spans(times, h, most=5)
    assert 1 <= len(got) <= 5
    assert all(lo <= hi for lo, hi in got)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(got))  # disjoint, ordered
    for t in times:  # every candidate's horizon lies inside one span
        assert any(lo <= t - h and t + h <= hi for lo, hi in got)
    if len(spans(times, h, most=100)) <= 5:  # nothing joined when few enough
        assert got == spans(times, h, most=100)
