"""Classify stage: every record of a range becomes exactly one of
accepted | cancel | duplicate | late | invalid.

A cancel (an event whose `cancels` names an earlier event id) is never usage: it is neither
deduplicated against the ledger nor late. It is idempotent by what it cancels (sink.py).

Deterministic (P1): the outcome depends only on the records, the range snapshot and the
ledger rows outside the range (P2). Transient failures (schema registry down, ledger
lookup failed) propagate as exceptions; they never turn an event into a dead letter (P6).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from consumer.config import MeterConfig
from consumer.decode import DecodedEvent, DecodeError, Decoder
from consumer.dedup import RecentIds, id_hash
from consumer.faults import poison_check
from consumer.records import Record
from consumer.validate import Invalid, Limits, validate
from consumer.window import Watermarks


@dataclass(frozen=True)
class Snapshot:
    """Everything classification depends on besides the records, frozen at range start.

    `schema_ids` records which writer schemas the range's messages name (for audits and for
    a re-form whose registry is down); `suspect` is the span a poison search is narrowing
    (P7, consumer/poison.py)."""

    watermarks: dict[str, int]
    config_hash: str
    stamp_ms: int
    schema_ids: list[int] = field(default_factory=list)
    suspect: tuple[int, int] | None = None

    def to_json(self) -> str:
        body: dict[str, object] = {
            "watermarks": self.watermarks,
            "config_hash": self.config_hash,
            "stamp_ms": self.stamp_ms,
            "schema_ids": self.schema_ids,
        }
        if self.suspect is not None:
            body["suspect"] = list(self.suspect)
        return json.dumps(body, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        d = json.loads(text)
        suspect = d.get("suspect")
        return cls(
            {k: int(v) for k, v in d["watermarks"].items()},
            d["config_hash"],
            int(d["stamp_ms"]),
            [int(i) for i in d.get("schema_ids", [])],
            (int(suspect[0]), int(suspect[1])) if suspect else None,
        )


@dataclass(frozen=True, slots=True)
class Accepted:
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


@dataclass
class Classified:
    accepted: list[Accepted] = field(default_factory=list)
    cancels: list[Accepted] = field(default_factory=list)
    late: list[Late] = field(default_factory=list)
    invalid: list[DeadLetter] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)
    false_positives: int = 0
    cross_partition: int = 0  # duplicates whose ledger copy came from another partition
    watermarks_after: dict[str, int] = field(default_factory=dict)


# (meter, event ids) -> those the ledger holds outside the range being formed (P2), each
# with the partition its copy came from.
LedgerLookup = Callable[[str, list[str]], dict[str, int]]


@dataclass
class Classifier:
    decoder: Decoder
    meters: dict[str, MeterConfig]
    limits: Limits

    def classify(
        self,
        records: Sequence[Record],
        snapshot: Snapshot,
        recent: RecentIds,
        in_ledger: LedgerLookup,
    ) -> Classified:
        out = Classified()
        marks = Watermarks(snapshot.watermarks)
        valid: list[tuple[Record, DecodedEvent, MeterConfig]] = []
        poison_check(r.value for r in records)  # a fault hook; off in production
        for rec in records:
            try:
                event = self.decoder.decode(rec.value)
                meter = validate(event, rec.timestamp_ms, self.meters, self.limits)
            except (DecodeError, Invalid) as exc:
                out.invalid.append(DeadLetter(rec, exc.reason, exc.detail))
                continue
            if event.cancels:
                out.cancels.append(Accepted(rec, event, meter))
            else:
                valid.append((rec, event, meter))
        known = self._confirmed_in_ledger(valid, recent, in_ledger, out)
        seen: set[tuple[str, str]] = set()
        late: list[Late] = []
        for rec, event, meter in valid:
            key = (meter.name, event.event_id)
            if key in seen or key in known:
                self._count_duplicate(out, meter.name)
                out.cross_partition += known.get(key, rec.partition) != rec.partition
                continue
            seen.add(key)
            lateness = meter.allowed_lateness_seconds * 1000
            if marks.is_late(meter.name, event.timestamp_ms, lateness):
                mark = marks.get(meter.name)
                assert mark is not None
                late.append(Late(rec, event, meter, mark))
                continue
            marks.observe(meter.name, event.timestamp_ms)
            out.accepted.append(Accepted(rec, event, meter))
        out.late = late  # a late copy of an event the ledger holds was a duplicate above
        out.watermarks_after = marks.by_meter
        return out

    @staticmethod
    def quarantine(records: Sequence[Record], snapshot: Snapshot, attempts: int) -> Classified:
        """Dead-letter a poison range without decoding it again (P7)."""
        detail = f"the consumer crashed {attempts} times on this message; quarantined undecoded"
        return Classified(
            invalid=[DeadLetter(r, "poison", detail) for r in records],
            watermarks_after=dict(snapshot.watermarks),
        )

    @staticmethod
    def _count_duplicate(out: Classified, meter: str) -> None:
        out.duplicates[meter] = out.duplicates.get(meter, 0) + 1

    @staticmethod
    def _confirmed_in_ledger(
        valid: list[tuple[Record, DecodedEvent, MeterConfig]],
        recent: RecentIds,
        in_ledger: LedgerLookup,
        out: Classified,
    ) -> dict[tuple[str, str], int]:
        """One batched lookup per meter for every id of the range. The dedup key is (meter,
        event id): a copy another partition wrote, or one older than the filter's window,
        is a duplicate even when its timestamp (so its ledger identity) differs. The filter
        only tells how a duplicate was expected (its false positives are counted)."""
        ids: dict[str, set[str]] = {}
        flagged: dict[str, set[str]] = {}
        maybe = recent.seen([id_hash(m.name, e.event_id) for _, e, m in valid])
        for (_, event, meter), seen in zip(valid, maybe, strict=True):
            ids.setdefault(meter.name, set()).add(event.event_id)
            if seen:
                flagged.setdefault(meter.name, set()).add(event.event_id)
        known: dict[tuple[str, str], int] = {}
        for meter_name, all_ids in ids.items():
            found = in_ledger(meter_name, sorted(all_ids))
            out.false_positives += len(flagged.get(meter_name, set()) - found.keys())
            known.update(((meter_name, i), p) for i, p in found.items())
        return known
