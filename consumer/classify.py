"""Classify stage: every record of a range becomes exactly one of
accepted | duplicate | late | invalid.

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
from consumer.records import Record
from consumer.validate import Invalid, Limits, validate
from consumer.window import Watermarks


@dataclass(frozen=True)
class Snapshot:
    """Everything classification depends on besides the records, frozen at range start.

    `schema_ids` records which writer schemas the range used (for audits and for a re-form
    whose registry is down)."""

    watermarks: dict[str, int]
    config_hash: str
    stamp_ms: int
    schema_ids: list[int] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(
            {
                "watermarks": self.watermarks,
                "config_hash": self.config_hash,
                "stamp_ms": self.stamp_ms,
                "schema_ids": self.schema_ids,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        d = json.loads(text)
        return cls(
            {k: int(v) for k, v in d["watermarks"].items()},
            d["config_hash"],
            int(d["stamp_ms"]),
            [int(i) for i in d.get("schema_ids", [])],
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
    late: list[Late] = field(default_factory=list)
    invalid: list[DeadLetter] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)
    false_positives: int = 0
    schema_ids: set[int] = field(default_factory=set)
    watermarks_after: dict[str, int] = field(default_factory=dict)


# (meter, event ids) -> the subset the ledger holds outside the range being formed (P2).
LedgerLookup = Callable[[str, list[str]], set[str]]


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
        for rec in records:
            try:
                event = self.decoder.decode(rec.value)
                meter = validate(event, rec.timestamp_ms, self.meters, self.limits)
            except (DecodeError, Invalid) as exc:
                out.invalid.append(DeadLetter(rec, exc.reason, exc.detail))
                continue
            out.schema_ids.add(event.schema_id)
            valid.append((rec, event, meter))
        known = self._confirmed_in_ledger(valid, recent, in_ledger, out)
        seen: set[tuple[str, str]] = set()
        late: list[Late] = []
        for rec, event, meter in valid:
            key = (meter.name, event.event_id)
            if key in seen or key in known:
                self._count_duplicate(out, meter.name)
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
        out.late = self._late_not_in_ledger(late, in_ledger, out)
        out.watermarks_after = marks.by_meter
        return out

    @staticmethod
    def _count_duplicate(out: Classified, meter: str) -> None:
        out.duplicates[meter] = out.duplicates.get(meter, 0) + 1

    def _late_not_in_ledger(
        self, late: list[Late], in_ledger: LedgerLookup, out: Classified
    ) -> list[Late]:
        """A late copy of an event another partition already wrote is a duplicate, not late
        usage. Either way it stays out of the ledger, so totals never depend on this."""
        by_meter: dict[str, list[str]] = {}
        for x in late:
            by_meter.setdefault(x.meter.name, []).append(x.event.event_id)
        known = {(m, i) for m, ids in by_meter.items() for i in in_ledger(m, sorted(set(ids)))}
        kept = []
        for x in late:
            if (x.meter.name, x.event.event_id) in known:
                self._count_duplicate(out, x.meter.name)
            else:
                kept.append(x)
        return kept

    @staticmethod
    def _confirmed_in_ledger(
        valid: list[tuple[Record, DecodedEvent, MeterConfig]],
        recent: RecentIds,
        in_ledger: LedgerLookup,
        out: Classified,
    ) -> set[tuple[str, str]]:
        """Ask the ledger only about ids the filter flags; returns the confirmed ones."""
        candidates: dict[str, list[str]] = {}
        for _, event, meter in valid:
            if recent.might_contain(id_hash(meter.name, event.event_id)):
                candidates.setdefault(meter.name, []).append(event.event_id)
        known: set[tuple[str, str]] = set()
        for meter_name, ids in candidates.items():
            found = in_ledger(meter_name, sorted(set(ids)))
            out.false_positives += len(set(ids) - found)
            known.update((meter_name, i) for i in found)
        return known
