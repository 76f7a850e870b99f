"""Classify stage: every record of a range becomes exactly one of
accepted | cancel | duplicate | late | invalid.

A cancel (an event whose `cancels` names an earlier event id) is never usage: it is neither
deduplicated against the ledger nor late. It is idempotent by what it cancels (sink.py).

Deterministic (P1): the outcome depends only on the records, the range snapshot and the
ledger rows outside the range (P2). Ranges classified together in one batch are
deduplicated against each other too (an earlier range's accepted copy wins), since none of
them is in the ledger yet. Transient failures (schema registry down, ledger
lookup failed) propagate as exceptions; they never turn an event into a dead letter (P6).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from consumer.classify.snapshot import Snapshot
from consumer.config import MeterConfig
from consumer.decode.columns import (
    CANCEL,
    INVALID,
    LEDGER_SCHEMA,
    USAGE,
    Events,
    RangeDecoder,
)
from consumer.decode.event import DecodedEvent
from consumer.decode.reference import Decoder
from consumer.decode.validate import Limits
from consumer.records import RangeInput, Record


@dataclass(frozen=True, slots=True)
class Accepted:
    """One event as an object: cancels, and accepted events where a test reads them."""

    record: Record
    event: DecodedEvent
    meter: MeterConfig


@dataclass(frozen=True, slots=True)
class Late:
    record: Record
    event: DecodedEvent
    meter: MeterConfig
    watermark_ms: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: Record
    reason: str
    detail: str


@dataclass(eq=False)
class AcceptedBatch:
    """A range's accepted events as ledger columns (decode/columns.py), in offset
    order; no Python object per event."""

    table: pa.Table
    per_meter: dict[str, int]
    per_event: Mapping[str, str] = field(default_factory=dict)  # meter -> Stripe event name
    _rows: Callable[[], list[Accepted]] | None = None

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def __iter__(self) -> Iterator[Accepted]:
        return iter(self.rows())

    def __getitem__(self, i: int) -> Accepted:
        return self.rows()[i]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, AcceptedBatch)
            and self.table.equals(other.table)
            and self.per_meter == other.per_meter
        )

    def rows(self) -> list[Accepted]:
        """Every event as an object (slow; for tests and diagnostics)."""
        return self._rows() if self._rows is not None else []

    @classmethod
    def empty(cls) -> AcceptedBatch:
        return cls(LEDGER_SCHEMA.empty_table(), {})


def per_event_meters(meters: Iterable[MeterConfig]) -> dict[str, str]:
    """Meter -> Stripe event name, for the meters billed one push per event."""
    return {
        m.name: m.stripe_event_name
        for m in meters
        if m.stripe_event_name and m.emission == "per_event"
    }


@dataclass
class Classified:
    accepted: AcceptedBatch = field(default_factory=AcceptedBatch.empty)
    cancels: list[Accepted] = field(default_factory=list)
    late: list[Late] = field(default_factory=list)
    invalid: list[DeadLetter] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)
    cross_partition: int = 0  # duplicates whose ledger copy came from another partition
    # (meter, minute start s) of the events whose copy the ledger holds: where a row an
    # earlier attempt of this range wrote may need settling (sinks/copies.py)
    held_minutes: set[tuple[str, int]] = field(default_factory=set)
    watermarks_after: dict[str, int] = field(default_factory=dict)
    schema_ids: list[int] = field(default_factory=list)  # named by the range's headers


# The candidates of a batch of ranges (CANDIDATE_SCHEMA: one row per distinct (meter, event
# id) of each range, with its event time and the range's span) -> candidate row -> the
# partition of a copy the ledger holds outside that row's own range (P2), within the dedup
# horizon of the candidate's event time (sinks/ledger.py).
LedgerLookup = Callable[[pa.Table], dict[int, int]]
CANDIDATE_SCHEMA = pa.schema(
    [
        ("ci", pa.uint32()),
        ("meter", pa.string()),
        ("event_id", pa.string()),
        ("event_time", pa.int64()),  # ms
        ("topic", pa.string()),
        ("topic_id", pa.string()),
        ("partition", pa.uint32()),
        ("range_start", pa.uint64()),
        ("range_end", pa.uint64()),
        # the range's own rows may read '(unrecorded)': it was opened before migration 25
        ("own_unrecorded", pa.bool_()),
    ]
)


@dataclass(frozen=True)
class Job:
    """One range to classify: its messages, its span [start, end) and what it depends on."""

    inp: RangeInput
    start: int
    end: int
    snapshot: Snapshot


@dataclass
class _Dedup:
    """One range's usage rows split into first occurrences and later copies."""

    first: npt.NDArray[np.intp]  # rows, ascending
    copies: npt.NDArray[np.intp]  # rows that repeat an earlier row's (meter, event id)
    copy_of: npt.NDArray[np.intp]  # for each copy, the first occurrence's position in `first`
    keys: npt.NDArray[np.int64]  # the distinct keys of the usage rows, sorted
    usage: npt.NDArray[np.intp]  # the usage rows
    key_of: npt.NDArray[np.intp]  # each usage row's position in `keys`


class Classifier:
    """Classifies ranges; deterministic (P1): same records and snapshot, same outcome."""

    def __init__(self, decoder: Decoder, meters: Mapping[str, MeterConfig], limits: Limits) -> None:
        self.decoder = decoder
        self.meters = dict(meters)
        self.limits = limits
        self.ranges = RangeDecoder(decoder, self.meters, limits)
        self.per_event = per_event_meters(self.meters.values())

    def classify(
        self,
        records: Sequence[Record] | RangeInput,
        snapshot: Snapshot,
        in_ledger: LedgerLookup,
    ) -> Classified:
        """One range, its span being its records' offsets."""
        inp = records if isinstance(records, RangeInput) else RangeInput.of_records(records)
        start = int(inp.offsets[0]) if len(inp) else 0
        end = int(inp.offsets[-1]) + 1 if len(inp) else 0
        return self.classify_all([Job(inp, start, end, snapshot)], in_ledger)[0]

    def classify_all(self, jobs: Sequence[Job], in_ledger: LedgerLookup) -> list[Classified]:
        """Several ranges with one ledger question for all of them."""
        events = [self.ranges.decode(j.inp) for j in jobs]
        dedups = [_split_copies(ev) for ev in events]
        found = self._in_ledger(jobs, events, dedups, in_ledger)
        shared = _shared_rows(events, dedups)
        claimed: dict[tuple[str, str], int] = {}
        out: list[Classified] = []
        for i, (j, ev, d, f) in enumerate(zip(jobs, events, dedups, found, strict=True)):
            if shared is not None:
                _claimed_earlier(ev, d, f, claimed, shared[i])
            c, accepted = self._outcome(j, ev, d, f)
            out.append(c)
            if shared is not None:
                _claim(ev, accepted[shared[i][accepted]], j.inp.partition, claimed)
        return out

    @staticmethod
    def quarantine(inp: RangeInput, snapshot: Snapshot, attempts: int) -> Classified:
        """Dead-letter a poison range without decoding it again (P7)."""
        detail = f"the consumer crashed {attempts} times on this message; quarantined undecoded"
        return Classified(
            invalid=[DeadLetter(inp.record(i), "poison", detail) for i in range(len(inp))],
            watermarks_after=dict(snapshot.watermarks),
        )

    @staticmethod
    def _in_ledger(
        jobs: Sequence[Job],
        events: Sequence[Events],
        dedups: Sequence[_Dedup],
        in_ledger: LedgerLookup,
    ) -> list[npt.NDArray[np.int64]]:
        """One batched question about every first occurrence of every range. The dedup key
        is (meter, event id): a copy another partition wrote, or one older than the filter's
        window, is a duplicate even when its timestamp (so its ledger identity) differs.
        Returns, per range and first occurrence, the partition of the ledger's copy or -1."""
        parts: list[pa.Table] = []
        base = 0
        for j, ev, d in zip(jobs, events, dedups, strict=True):
            n = len(d.first)
            if not n:
                continue
            meter, event_id = ev.id_columns(d.first)
            parts.append(
                pa.table(
                    [
                        pa.array(np.arange(base, base + n, dtype=np.uint32)),
                        meter,
                        event_id,
                        pa.array(ev.ts[d.first], pa.int64()),
                        pa.array([j.inp.topic] * n, pa.string()),
                        pa.array([j.inp.topic_id] * n, pa.string()),
                        pa.array(np.full(n, j.inp.partition, np.uint32)),
                        pa.array(np.full(n, j.start, np.uint64)),
                        pa.array(np.full(n, j.end, np.uint64)),
                        pa.array(np.full(n, not j.snapshot.incarnated), pa.bool_()),
                    ],
                    schema=CANDIDATE_SCHEMA,
                )
            )
            base += n
        held = in_ledger(pa.concat_tables(parts)) if parts else {}
        out: list[npt.NDArray[np.int64]] = []
        base = 0
        for d in dedups:
            got = np.full(len(d.first), -1, np.int64)
            for ci, partition in held.items():
                if base <= ci < base + len(d.first):
                    got[ci - base] = partition
            out.append(got)
            base += len(d.first)
        return out

    def _outcome(
        self, job: Job, ev: Events, d: _Dedup, found: npt.NDArray[np.int64]
    ) -> tuple[Classified, npt.NDArray[np.intp]]:
        """The range's outcome, and the rows it accepted."""
        out = Classified(schema_ids=ev.schema_ids)
        inp, table = job.inp, ev.meters
        # duplicates: later copies in the range, and first occurrences the ledger holds
        held = found >= 0
        dup_rows = np.concatenate([d.first[held], d.copies])
        dup_found = np.concatenate([found[held], found[d.copy_of]])
        out.cross_partition = int(np.count_nonzero((dup_found >= 0) & (dup_found != inp.partition)))
        out.duplicates = _per_meter(table.meters, ev.meter[dup_rows])
        rows = d.first[held]
        out.held_minutes = {
            (table.meters[m].name, t // 60_000 * 60)
            for m, t in zip(ev.meter[rows].tolist(), ev.ts[rows].tolist(), strict=True)
        }
        # late: behind the watermark of its meter by more than the allowed lateness
        fresh = d.first[~held]
        late_rows, marks, after = _lateness(ev, fresh, job.snapshot.watermarks)
        out.watermarks_after = after
        accepted = np.setdiff1d(fresh, late_rows, assume_unique=True)
        out.accepted = AcceptedBatch(
            ev.ledger_table(accepted),
            _per_meter(table.meters, ev.meter[accepted]),
            self.per_event,
            lambda: [Accepted(inp.record(i), ev.event(i), ev.meter_of(i)) for i in accepted],
        )
        out.late = [
            Late(inp.record(i), ev.event(i), ev.meter_of(i), m)
            for i, m in zip(late_rows.tolist(), marks.tolist(), strict=True)
        ]
        out.cancels = [
            Accepted(inp.record(i), ev.event(i), ev.meter_of(i))
            for i in np.flatnonzero(ev.kind == CANCEL).tolist()
        ]
        out.invalid = [
            DeadLetter(inp.record(i), *ev.dead[i])
            for i in np.flatnonzero(ev.kind == INVALID).tolist()
        ]
        return out, accepted


def _split_copies(ev: Events) -> _Dedup:
    """First occurrence by offset of each (meter, event id) among the usage rows. Equal keys
    are confirmed on the ids themselves, so a 64-bit key collision never drops an event."""
    rows = np.flatnonzero(ev.kind == USAGE)
    keys = ev.key[rows]
    distinct, first_at, inverse, counts = np.unique(
        keys, return_index=True, return_inverse=True, return_counts=True
    )
    if not len(rows) or counts.max() == 1:
        return _Dedup(rows, rows[:0], rows[:0], distinct, rows, inverse)
    is_first = np.zeros(len(rows), bool)
    is_first[first_at] = True
    owner = np.arange(len(rows))  # position (in `rows`) of each row's first occurrence
    owner[:] = first_at[inverse]
    shared = np.flatnonzero(counts[inverse] > 1)  # rows whose key repeats: compare ids
    exact: dict[tuple[int, str], int] = {}
    for pos in shared.tolist():  # ascending: the first of each exact key is seen first
        i = int(rows[pos])
        name = ev.fast.event_id[i].as_py() if i not in ev.slow else ev.slow[i].event_id
        k = (int(ev.meter[i]), str(name))
        if k in exact:
            is_first[pos], owner[pos] = False, exact[k]
        else:
            exact[k] = pos
            is_first[pos], owner[pos] = True, pos
    first = rows[is_first]
    index_in_first = np.cumsum(is_first) - 1  # position in `first` of each first occurrence
    copies = np.flatnonzero(~is_first)
    return _Dedup(first, rows[copies], index_in_first[owner[copies]], distinct, rows, inverse)


def _shared_rows(
    events: Sequence[Events], dedups: Sequence[_Dedup]
) -> list[npt.NDArray[np.bool_]] | None:
    """Per range, which of its rows are usage whose key another range of the batch holds
    too; None when no key is in two ranges (almost always: one sort of the ranges'
    distinct keys, about 15 ns an event)."""
    sizes = [len(d.keys) for d in dedups]
    if sum(1 for n in sizes if n) < 2:
        return None
    present = np.concatenate([d.keys for d in dedups])
    order = np.argsort(present, kind="stable")
    ordered = present[order]
    pairs = np.flatnonzero(ordered[1:] == ordered[:-1])  # keys are distinct within a range
    if not len(pairs):
        return None
    shared = np.zeros(len(present), bool)
    shared[order[pairs]] = True
    shared[order[pairs + 1]] = True
    out = []
    for ev, d, mask in zip(events, dedups, np.split(shared, np.cumsum(sizes)[:-1]), strict=True):
        rows = np.zeros(len(ev.kind), bool)
        rows[d.usage] = mask[d.key_of]
        out.append(rows)
    return out


def _claimed_earlier(
    ev: Events,
    d: _Dedup,
    found: npt.NDArray[np.int64],
    claimed: Mapping[tuple[str, str], int],
    shared: npt.NDArray[np.bool_],
) -> None:
    """Marks (in `found`, with the winner's partition) the first occurrences an earlier
    range of the same batch accepted (`claimed`: (meter, event id) -> partition). The
    ranges of a batch are classified before any of them writes, so the ledger cannot answer
    for them; without this both copies would be billed. Only an accepted copy claims,
    because only it leaves a ledger row: a range re-formed alone after a crash then finds
    that row, and a copy whose earlier twin was late is accepted as it would be alone.
    `shared` (per row) only narrows the search; the ids decide, so a 64-bit key collision
    never drops an event."""
    if not claimed:
        return
    open_ = np.flatnonzero((found < 0) & shared[d.first])
    if not len(open_):
        return
    meter, event_id = ev.id_columns(d.first[open_])
    for pos, m, e in zip(open_.tolist(), meter.to_pylist(), event_id.to_pylist(), strict=True):
        partition = claimed.get((m, e))
        if partition is not None:
            found[pos] = partition


def _claim(
    ev: Events, rows: npt.NDArray[np.intp], partition: int, claimed: dict[tuple[str, str], int]
) -> None:
    """Records the ids of accepted rows whose keys other ranges of the batch hold too."""
    if not len(rows):
        return
    meter, event_id = ev.id_columns(rows)
    for m, e in zip(meter.to_pylist(), event_id.to_pylist(), strict=True):
        claimed.setdefault((m, e), partition)


def _lateness(
    ev: Events, rows: npt.NDArray[np.intp], initial: Mapping[str, int]
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64], dict[str, int]]:
    """Rows behind their meter's watermark (the highest earlier event time, from the
    snapshot's mark on) by more than its allowed lateness, with the mark each was behind,
    and the marks after the range. A late event never moves a mark, so the running maximum
    over all of them is the reference's mark of accepted events."""
    after = dict(initial)
    late: list[npt.NDArray[np.intp]] = []
    marks: list[npt.NDArray[np.int64]] = []
    meter_rows = ev.meter[rows]
    for m in np.unique(meter_rows).tolist():
        sel = rows[meter_rows == m]
        name = ev.meters.meters[m].name
        ts = ev.ts[sel]
        mark = np.maximum.accumulate(ts)
        if name in initial:
            mark = np.maximum(mark, initial[name])
        is_late = ts < mark - ev.meters.lateness_ms[m]
        late.append(sel[is_late])
        marks.append(mark[is_late])
        after[name] = int(mark[-1])
    if not late:
        return rows[:0], np.empty(0, np.int64), after
    all_late, all_marks = np.concatenate(late), np.concatenate(marks)
    order = np.argsort(all_late, kind="stable")
    return all_late[order], all_marks[order], after


def _per_meter(meters: Sequence[MeterConfig], positions: npt.NDArray[np.int16]) -> dict[str, int]:
    counts = np.bincount(positions.astype(np.int64), minlength=len(meters))
    return {meters[m].name: int(c) for m, c in enumerate(counts.tolist()) if c}
