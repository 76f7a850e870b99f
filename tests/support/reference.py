"""The per-event classifier, one message at a time: the model the columnar one must equal.

It is the straightforward reading of the rules (decode, validate, first occurrence by
offset wins, ledger copies outside the range are duplicates, so are copies an earlier range
of the same batch accepted, lateness against a running watermark), written without arrays
so that a test can compare the two on any input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from consumer.classify.classifier import Classified
from consumer.classify.snapshot import Snapshot
from consumer.config import MeterConfig
from consumer.decode.event import DecodedEvent, DecodeError
from consumer.decode.reference import Decoder
from consumer.decode.validate import Invalid, Limits, validate
from consumer.records import Record
from tests.support.window import Watermarks

Event = tuple[int, DecodedEvent, str]  # (offset, event, meter name)


@dataclass
class Outcome:
    """A classification as plain values, comparable across implementations."""

    accepted: list[Event] = field(default_factory=list)
    cancels: list[Event] = field(default_factory=list)
    late: list[tuple[int, DecodedEvent, str, int]] = field(default_factory=list)
    invalid: list[tuple[int, str, str]] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)
    cross_partition: int = 0
    watermarks_after: dict[str, int] = field(default_factory=dict)


def summary(out: Classified) -> Outcome:
    """What the columnar classifier decided, as an Outcome."""
    return Outcome(
        [(a.record.offset, a.event, a.meter.name) for a in out.accepted],
        [(c.record.offset, c.event, c.meter.name) for c in out.cancels],
        [(x.record.offset, x.event, x.meter.name, x.watermark_ms) for x in out.late],
        [(d.record.offset, d.reason, d.detail) for d in out.invalid],
        dict(out.duplicates),
        out.cross_partition,
        dict(out.watermarks_after),
    )


def classify(
    decoder: Decoder,
    meters: Mapping[str, MeterConfig],
    limits: Limits,
    records: Sequence[Record],
    snapshot: Snapshot,
    held: Mapping[tuple[str, str], int],
) -> Outcome:
    """`held`: (meter, event id) -> partition of a copy the ledger holds outside the range."""
    out = Outcome()
    marks = Watermarks(snapshot.watermarks)
    valid: list[tuple[Record, DecodedEvent, MeterConfig]] = []
    for rec in records:
        try:
            event = decoder.decode(rec.value)
            meter = validate(event, rec.timestamp_ms, meters, limits)
        except (DecodeError, Invalid) as exc:
            out.invalid.append((rec.offset, exc.reason, exc.detail))
            continue
        if event.cancels:
            out.cancels.append((rec.offset, event, meter.name))
        else:
            valid.append((rec, event, meter))
    seen_keys: set[tuple[str, str]] = set()
    for rec, event, meter in valid:
        key = (meter.name, event.event_id)
        if key in seen_keys or key in held:
            out.duplicates[meter.name] = out.duplicates.get(meter.name, 0) + 1
            out.cross_partition += held.get(key, rec.partition) != rec.partition
            continue
        seen_keys.add(key)
        lateness = meter.allowed_lateness_seconds * 1000
        if marks.is_late(meter.name, event.timestamp_ms, lateness):
            mark = marks.get(meter.name)
            assert mark is not None
            out.late.append((rec.offset, event, meter.name, mark))
            continue
        marks.observe(meter.name, event.timestamp_ms)
        out.accepted.append((rec.offset, event, meter.name))
    out.watermarks_after = marks.by_meter
    return out


def classify_batch(
    decoder: Decoder,
    meters: Mapping[str, MeterConfig],
    limits: Limits,
    ranges: Sequence[tuple[Sequence[Record], Snapshot]],
    held: Mapping[tuple[str, str], int],
) -> list[Outcome]:
    """Ranges classified together, in order: what an earlier one accepted is held for the
    later ones, as if already in the ledger (the ledger's own copy is reported first)."""
    outs: list[Outcome] = []
    claimed: dict[tuple[str, str], int] = {}
    for records, snapshot in ranges:
        out = classify(decoder, meters, limits, records, snapshot, {**claimed, **held})
        outs.append(out)
        for _, event, meter in out.accepted:
            claimed.setdefault((meter, event.event_id), records[0].partition)
    return outs
