"""ClickHouse sink: the idempotent writes of a batch of ranges.

Every row has a deterministic identity (P3): a retry of the same range writes the same
rows, which converge under FINAL. Windows are recomputed from the deduplicated ledger
and upserted, never accumulated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa

from consumer import crash_points
from consumer.classify.classifier import Classified, LedgerLookup
from consumer.classify.snapshot import Snapshot
from consumer.decode.columns import LEDGER_SCHEMA
from consumer.records import DECIMAL, TIME_MS, Record
from consumer.sinks.horizon import spans
from consumer.sinks.rollup import Cancel
from consumer.store import tenants
from consumer.store.backend import Backend
from consumer.store.migrations.m25_ledger_topic_id import UNRECORDED

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
    """Deterministic id of a batch, used as insert dedup token."""
    text = ";".join(f"{r.topic}/{r.partition}/{r.start}/{r.end}" for r in ranges)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def ledger_lookup(store: Backend, horizon_ms: int) -> LedgerLookup:
    """Which candidates the ledger already holds, ignoring each candidate's own range (P2):
    one query for a whole batch of ranges, the candidates sent as a table. A range is its
    topic's incarnation too: a row of a deleted topic at the same partition and offset is
    a copy like any other, and so is a row written before incarnations were recorded
    (migration 25: its topic_id matches none), except in a range opened before then,
    whose crashed attempt wrote its own rows that way.

    A copy counts when its event time is within `horizon_ms` of the candidate's, so the
    question reads the ledger's minutes around the batch's event times (the ledger is keyed
    meter and minute first), never its whole history. A copy carrying the same event time
    is found however long ago it was written; one its producer re-stamped by more than the
    horizon is a new event."""

    def lookup(candidates: pa.Table) -> dict[int, int]:
        if not candidates.num_rows:
            return {}
        near = " OR ".join(
            f"event_time BETWEEN fromUnixTimestamp64Milli({lo}, 'UTC') "
            f"AND fromUnixTimestamp64Milli({hi}, 'UTC')"
            for lo, hi in spans(candidates.column("event_time").to_pylist(), horizon_ms)
        )
        rows = store.query_with(
            f"""SELECT c.ci, min(u.partition) FROM (
                       SELECT meter, event_id, event_time, topic, topic_id, partition, offset
                       FROM usage_events
                   PREWHERE meter IN (SELECT meter FROM $candidates) AND ({near})
                        AND id_key IN (SELECT sipHash64(meter, event_id) FROM $candidates)) AS u
               INNER JOIN $candidates AS c ON u.meter = c.meter AND u.event_id = c.event_id
               WHERE NOT (u.topic = c.topic
                          AND (u.topic_id = c.topic_id
                               OR (c.own_unrecorded AND u.topic_id = '{UNRECORDED}'))
                          AND u.partition = c.partition
                          AND u.offset >= c.range_start AND u.offset < c.range_end)
                 AND abs(toUnixTimestamp64Milli(u.event_time) - c.event_time) <= {horizon_ms}
               GROUP BY c.ci""",
            {"candidates": candidates},
        )
        return {int(r[0]): int(r[1]) for r in rows}

    return lookup


def partitions_with_rows(
    store: Backend, topic: str, topic_id: str, partitions: Sequence[int]
) -> set[int]:
    """Of `partitions` of `topic`'s incarnation `topic_id`, those the ledger holds rows of
    (rows written before incarnations were recorded count too). Asked on assignment, and
    only of partitions without ingest state: their state was lost while their ledger rows
    stayed (a host crash without fsync_after_insert), so Kafka's committed offset cannot be
    trusted. One question a partition, which stops at its first row; a partition with none
    costs a scan of the ledger's partition column (a few ms at 10 million rows)."""
    found = set()
    for partition in sorted(set(partitions)):
        rows = store.query(
            """SELECT 1 FROM usage_events PREWHERE partition = {p:UInt32}
               WHERE topic = {t:String} AND topic_id IN ({id:String}, {unrecorded:String})
               LIMIT 1""",
            {"t": topic, "p": partition, "id": topic_id, "unrecorded": UNRECORDED},
        )
        if rows:
            found.add(partition)
    return found


def write_ledger(
    store: Backend, token: str, ranges: Sequence[RangeWrite], tenant_property: str | None = None
) -> int:
    """What the window recompute reads: the ledger and the cancellations; before them the
    tenants the events name (Stripe Connect reads those by key, store/tenants.py)."""
    accepted = accepted_table(ranges)
    tenants.write(store, tenant_property, accepted)
    if accepted.num_rows:
        store.insert_columns(
            "usage_events",
            dict(zip(accepted.column_names, accepted.columns, strict=True)),
            token=token,
        )
        crash_points.reached("after_write_usage_events")
    _write_cancellations(store, token, ranges)
    return int(accepted.num_rows)


def write_outputs(store: Backend, token: str, ranges: Sequence[RangeWrite], now_ms: int) -> None:
    """What nothing else of the batch reads: per-event pushes, dead letters, late events."""
    _write_per_event_pushes(store, token, ranges, now_ms)
    crash_points.reached("after_write_stripe_pushes")
    _write_dead_letters(store, token, ranges, now_ms)
    crash_points.reached("after_write_dead_letters")
    _write_late(store, token, ranges)


def accepted_table(ranges: Sequence[RangeWrite]) -> pa.Table:
    """Every accepted event of the batch as ledger columns."""
    tables = [r.classified.accepted.table for r in ranges]
    return pa.concat_tables(tables) if tables else LEDGER_SCHEMA.empty_table()


def _write_per_event_pushes(
    store: Backend, token: str, ranges: Sequence[RangeWrite], now_ms: int
) -> None:
    """One pending push per accepted event of a per_event meter, built in ClickHouse from
    the ledger columns; the identifier is `per_event_identifier` in SQL (a test holds the
    two equal)."""
    by_config: dict[tuple[tuple[str, str], ...], list[pa.Table]] = {}
    for r in ranges:
        batch = r.classified.accepted
        if batch.per_event and len(batch):
            by_config.setdefault(tuple(sorted(batch.per_event.items())), []).append(batch.table)
    if not by_config:
        return
    for i, (meters, tables) in enumerate(sorted(by_config.items())):
        params = {"now": now_ms, "m": [m for m, _ in meters], "s": [s for _, s in meters]}
        # Named as open work first (outbox.py): a push is never in stripe_pushes unnamed.
        store.command_with(
            f"""INSERT INTO stripe_open (identifier, status_rank, held, version,
                                        stripe_timestamp)
               SELECT {PER_EVENT_IDENTIFIER_SQL}, {PENDING}, 0, {2 * PENDING}, event_time
               FROM (SELECT event_id, event_time,
                            transform(meter, {{m:Array(String)}}, {{s:Array(String)}}, '') AS name
                     FROM $accepted)
               WHERE name != ''""",
            {"accepted": pa.concat_tables(tables)},
            params,
        )
        store.command_with(
            f"""INSERT INTO stripe_pushes (identifier, mode, meter, stripe_event_name,
                   customer_id, bucket_start, revision, value, status_rank, first_attempt_at,
                   updated_at)
               SELECT {PER_EVENT_IDENTIFIER_SQL}, 'per_event', meter, name, customer_id,
                      event_time, 0, value, {PENDING}, fromUnixTimestamp64Milli(0, 'UTC'),
                      fromUnixTimestamp64Milli({{now:Int64}}, 'UTC')
               FROM (SELECT meter, customer_id, event_id, event_time, value,
                            transform(meter, {{m:Array(String)}}, {{s:Array(String)}}, '') AS name
                     FROM $accepted)
               WHERE name != ''
               SETTINGS insert_deduplication_token = '{token}-{i}'""",
            {"accepted": pa.concat_tables(tables)},
            params,
        )


# per_event_identifier(name, event_id) over the columns `name` and `event_id`, each part
# escaped as consumer/emitter/plan/identifiers.py escapes it
_ESCAPED = "replaceAll(replaceAll({}, '\\x1e', '\\x1e\\x1e'), '\\x1f', '\\x1e\\x1f')"
PER_EVENT_IDENTIFIER_SQL = (
    "concat('uc1e_', substring(lower(hex(SHA256(concat("
    + _ESCAPED.format("name")
    + ", '\\x1f', "
    + _ESCAPED.format("event_id")
    + ")))), 1, 40))"
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
            # a re-driven copy's link to its original is among them (side_outputs.REDRIVE_OF)
            "header_keys": pa.array(
                [[k for k, _ in d.record.headers] for d in dead], pa.list_(pa.string())
            ),
            "header_values": pa.array(
                [[v for _, v in d.record.headers] for d in dead], pa.list_(pa.binary())
            ),
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


def cancels_of(ranges: Sequence[RangeWrite]) -> list[Cancel]:
    """What the batch's cancel events take back, in a stable order."""
    latest: dict[tuple[str, str, str], int] = {}
    for r in ranges:
        for c in r.classified.cancels:
            key = (c.meter.name, c.event.customer_id, c.event.cancels)
            latest[key] = max(latest.get(key, c.event.timestamp_ms), c.event.timestamp_ms)
    return sorted((*k, t) for k, t in latest.items())
