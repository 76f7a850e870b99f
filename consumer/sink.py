"""ClickHouse sink: the idempotent writes of a batch of ranges.

Every row has a deterministic identity (P3): a retry of the same range writes the same
rows, which converge under FINAL. Windows are recomputed from the deduplicated ledger
and upserted, never accumulated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

import pyarrow as pa

from consumer.classify import Classified, LedgerLookup, Snapshot
from consumer.exact import EXACT
from consumer.faults import fault_point
from consumer.identifiers import per_event_identifier
from consumer.records import Record
from consumer.store.backend import DECIMAL, TIME_MS, Backend
from consumer.window import minute_of

VER_BASE = 1 << 62
PENDING = 1
Timer = Callable[[str], object]


@dataclass
class RangeWrite:
    """One partition's range [start, end) with its classification and snapshot."""

    topic: str
    partition: int
    start: int
    end: int
    attempt: int
    snapshot: Snapshot
    classified: Classified


def batch_id(ranges: Sequence[RangeWrite]) -> str:
    """Deterministic id of a batch, used as insert dedup token and dirty-window key."""
    text = ";".join(f"{r.topic}/{r.partition}/{r.start}/{r.end}" for r in ranges)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def ledger_lookup(store: Backend, topic: str, partition: int, start: int, end: int) -> LedgerLookup:
    """Which ids the ledger holds, ignoring rows from this very range (P2)."""

    def lookup(meter: str, event_ids: list[str]) -> dict[str, int]:
        rows = store.query(
            """SELECT event_id, min(partition) FROM usage_events
               WHERE meter = {m:String} AND event_id IN {ids:Array(String)}
                 AND NOT (topic = {t:String} AND partition = {p:UInt32}
                          AND offset >= {a:UInt64} AND offset < {b:UInt64})
               GROUP BY event_id""",
            {"m": meter, "ids": event_ids, "t": topic, "p": partition, "a": start, "b": end},
        )
        return {str(r[0]): int(r[1]) for r in rows}

    return lookup


def write_effects(store: Backend, token: str, ranges: Sequence[RangeWrite], now_ms: int) -> int:
    """Ledger, dirty windows, per-event pushes, cancellations, dead letters and late events;
    returns how many events were accepted."""
    accepted = [a for r in ranges for a in r.classified.accepted]
    if accepted:
        store.insert_columns(
            "usage_events",
            {
                "meter": pa.array([a.meter.name for a in accepted]),
                "customer_id": pa.array([a.event.customer_id for a in accepted]),
                "event_id": pa.array([a.event.event_id for a in accepted]),
                "event_time": pa.array([a.event.timestamp_ms for a in accepted], TIME_MS),
                "value": pa.array([a.event.value for a in accepted], DECIMAL),
                "properties": pa.array(
                    [list(a.event.properties.items()) for a in accepted],
                    pa.map_(pa.string(), pa.string()),
                ),
                "schema_id": pa.array([a.event.schema_id for a in accepted], pa.uint32()),
                "topic": pa.array([a.record.topic for a in accepted]),
                "partition": pa.array([a.record.partition for a in accepted], pa.uint32()),
                "offset": pa.array([a.record.offset for a in accepted], pa.uint64()),
                "record_time": pa.array([a.record.timestamp_ms for a in accepted], TIME_MS),
                "ver": pa.array([VER_BASE - a.record.timestamp_ms for a in accepted], pa.uint64()),
            },
            token=token,
        )
        fault_point("after_write_usage_events")
        _write_dirty(
            store,
            token,
            {
                (a.meter.name, a.event.customer_id, minute_of(a.event.timestamp_ms))
                for a in accepted
            },
        )
        fault_point("after_write_dirty_windows")
        _write_per_event_pushes(store, token, ranges, now_ms)
        fault_point("after_write_stripe_pushes")
    _write_cancellations(store, token, ranges)
    _write_dead_letters(store, token, ranges, now_ms)
    fault_point("after_write_dead_letters")
    _write_late(store, token, ranges)
    return len(accepted)


def _write_dirty(store: Backend, token: str, keys: set[tuple[str, str, int]]) -> None:
    ordered = sorted(keys)
    store.insert_columns(
        "dirty_windows",
        {
            "batch_id": pa.array([token] * len(ordered)),
            "meter": pa.array([k[0] for k in ordered]),
            "customer_id": pa.array([k[1] for k in ordered]),
            "window_start": pa.array([k[2] // 1000 for k in ordered], pa.timestamp("s", tz="UTC")),
        },
        token=token,
    )


def _write_per_event_pushes(
    store: Backend, token: str, ranges: Sequence[RangeWrite], now_ms: int
) -> None:
    rows = [
        a
        for r in ranges
        for a in r.classified.accepted
        if a.meter.stripe_event_name and a.meter.emission == "per_event"
    ]
    if not rows:
        return
    names = [a.meter.stripe_event_name or "" for a in rows]
    store.insert_columns(
        "stripe_pushes",
        {
            "identifier": pa.array(
                [
                    per_event_identifier(n, a.event.event_id)
                    for n, a in zip(names, rows, strict=True)
                ]
            ),
            "mode": pa.array(["per_event"] * len(rows)),
            "meter": pa.array([a.meter.name for a in rows]),
            "stripe_event_name": pa.array(names),
            "customer_id": pa.array([a.event.customer_id for a in rows]),
            "bucket_start": pa.array([a.event.timestamp_ms for a in rows], TIME_MS),
            "revision": pa.array([0] * len(rows), pa.uint32()),
            "value": pa.array([a.event.value for a in rows], DECIMAL),
            "status_rank": pa.array([PENDING] * len(rows), pa.uint8()),
            "first_attempt_at": pa.array([0] * len(rows), TIME_MS),
            "updated_at": pa.array([now_ms] * len(rows), TIME_MS),
        },
        token=token,
    )


def _source_columns(records: Sequence[Record]) -> dict[str, pa.Array]:
    """Where each side-output row came from: its identity, and what re-drives dedupe on."""
    return {
        "topic": pa.array([r.topic for r in records]),
        "partition": pa.array([r.partition for r in records], pa.uint32()),
        "offset": pa.array([r.offset for r in records], pa.uint64()),
        "record_time": pa.array([r.timestamp_ms for r in records], TIME_MS),
    }


def _write_dead_letters(
    store: Backend, token: str, ranges: Sequence[RangeWrite], now_ms: int
) -> None:
    dead = [d for r in ranges for d in r.classified.invalid]
    if not dead:
        return
    store.insert_columns(
        "dead_letters",
        {
            **_source_columns([d.record for d in dead]),
            "reason": pa.array([d.reason for d in dead]),
            "detail": pa.array([d.detail for d in dead]),
            "key": pa.array([d.record.key or b"" for d in dead], pa.binary()),
            "payload": pa.array([d.record.value or b"" for d in dead], pa.binary()),
            "written_at": pa.array([now_ms] * len(dead), TIME_MS),
        },
        token=token,
    )


def _write_cancellations(store: Backend, token: str, ranges: Sequence[RangeWrite]) -> None:
    """Cancel events, keyed by what they cancel: a repeated cancel converges."""
    cancels = [c for r in ranges for c in r.classified.cancels]
    if not cancels:
        return
    store.insert_columns(
        "cancellations",
        {
            **_source_columns([c.record for c in cancels]),
            "meter": pa.array([c.meter.name for c in cancels]),
            "customer_id": pa.array([c.event.customer_id for c in cancels]),
            "cancelled_id": pa.array([c.event.cancels for c in cancels]),
            "event_id": pa.array([c.event.event_id for c in cancels]),
            "event_time": pa.array([c.event.timestamp_ms for c in cancels], TIME_MS),
        },
        token=token,
    )


def _write_late(store: Backend, token: str, ranges: Sequence[RangeWrite]) -> None:
    late = [x for r in ranges for x in r.classified.late]
    if not late:
        return
    store.insert_columns(
        "late_events",
        {
            **_source_columns([x.record for x in late]),
            "meter": pa.array([x.meter.name for x in late]),
            "customer_id": pa.array([x.event.customer_id for x in late]),
            "event_id": pa.array([x.event.event_id for x in late]),
            "event_time": pa.array([x.event.timestamp_ms for x in late], TIME_MS),
            "value": pa.array([x.event.value for x in late], DECIMAL),
            "watermark": pa.array([x.watermark_ms for x in late], TIME_MS),
        },
        token=token,
    )


Cancel = tuple[str, str, str]  # (meter, customer, cancelled event id)


def cancels_of(ranges: Sequence[RangeWrite]) -> list[Cancel]:
    """What the batch's cancel events take back, in a stable order."""
    return sorted(
        {
            (c.meter.name, c.event.customer_id, c.event.cancels)
            for r in ranges
            for c in r.classified.cancels
        }
    )


def recompute_windows(
    store: Backend, token: str, now_ms: int, cancels: Sequence[Cancel] = ()
) -> None:
    """Upsert every minute window the batch touched, recomputed from the whole ledger
    without cancelled events. The windows of events the batch cancels are found in the
    ledger now, not when the cancels were written, so a retry finds an original that another
    partition wrote meanwhile. A window left without events is written as a zero row (the
    analyst views leave those out)."""
    cancelled_windows = (
        """UNION DISTINCT
               SELECT meter, customer_id, toDateTime(toStartOfMinute(event_time), 'UTC')
               FROM usage_events
               WHERE (meter, customer_id, event_id) IN {c:Array(Tuple(String, String, String))}"""
        if cancels
        else ""
    )
    store.command(
        f"""INSERT INTO usage_windows
           WITH dirty AS (
               SELECT meter, customer_id, window_start FROM dirty_windows
               WHERE batch_id = {{b:String}}
               {cancelled_windows})
           SELECT d.meter, d.customer_id, d.window_start, a.s, a.n, a.lo, a.hi, a.fv, a.ft,
                  a.lv, a.lt, fromUnixTimestamp64Milli({{now:Int64}}, 'UTC')
           FROM (SELECT DISTINCT meter, customer_id, window_start FROM dirty) AS d
           LEFT JOIN (
               SELECT meter, customer_id, toDateTime(toStartOfMinute(event_time), 'UTC') AS ws,
                      sum(value) AS s, count() AS n, min(value) AS lo, max(value) AS hi,
                      argMin(value, (event_time, event_id)) AS fv, min(event_time) AS ft,
                      argMax(value, (event_time, event_id)) AS lv, max(event_time) AS lt
               FROM usage_events FINAL
               WHERE (meter, customer_id, toStartOfHour(event_time)) IN (
                        SELECT DISTINCT meter, customer_id, toStartOfHour(window_start) FROM dirty)
                 AND (meter, customer_id, toDateTime(toStartOfMinute(event_time), 'UTC')) IN (
                        SELECT meter, customer_id, window_start FROM dirty)
                 AND (meter, customer_id, event_id) NOT IN (
                        SELECT meter, customer_id, cancelled_id FROM cancellations
                        WHERE (meter, customer_id) IN (
                            SELECT DISTINCT meter, customer_id FROM dirty))
               GROUP BY meter, customer_id, ws) AS a
             ON d.meter = a.meter AND d.customer_id = a.customer_id AND d.window_start = a.ws""",
        {"b": token, "now": now_ms, "c": list(cancels)},
    )


def exact(value: Decimal) -> str:
    """Decimal as a plain string without exponent or trailing zeros ("10", "0.5")."""
    text = format(value.normalize(EXACT), "f")
    return text if "." not in text else text.rstrip("0").rstrip(".") or "0"
