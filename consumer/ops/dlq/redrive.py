"""`dlq redrive`: send dead letters back through the pipeline once their cause is fixed.

Each dead letter's original bytes are produced again to its own topic and partition, with
its original key and record time, and with headers naming the dead letter (REDRIVE_OF) and
the run (REDRIVE_ID). Nothing here counts anything: the copy is consumed like any message,
so the exactly-once of a re-drive is the pipeline's own:

- A dead letter's event is not in the ledger (only accepted events are), so its first copy
  is not a duplicate of it. Every copy carries the same bytes, hence the same (meter, event
  id, event time): a second copy, from a re-run or a killed run resumed, is a duplicate of
  the first as long as the ledger keeps it (clickhouse.retention.ledger_days).
- The copy is classified as of now: one behind its meter's watermark by more than the
  allowed lateness is a late event (the late topic and `late_events`), not usage; one that
  fails again is a new dead letter with its new reason and the REDRIVE_OF link.

Every re-drive is recorded in `dlq_redrives`: intended before the produce, sent with the
copy's offset after the broker confirmed it. A re-run skips what was sent (unless
`again`), and re-sends what a killed run intended, which at worst makes a second copy.
"""

from __future__ import annotations

import getpass
import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
from confluent_kafka import KafkaError, Message, Producer

from consumer import crash_points
from consumer.classify.classifier import CANDIDATE_SCHEMA
from consumer.classify.snapshot import Snapshot
from consumer.config import MeterConfig
from consumer.decode.validate import Invalid, Limits, validate
from consumer.intent.state import load_states
from consumer.ops.dlq.links import INTENDED, REDRIVE_ID, REDRIVE_OF, SENT
from consumer.ops.dlq.select import DeadLetterRow, DlqError
from consumer.sinks.ledger import ledger_lookup
from consumer.store.backend import Backend

CHUNK = 500
Progress = Callable[[int], None]

# What a dead letter's copy is expected to become, as of the dry run.
COUNTS = "counts"
DUPLICATE = "duplicate"
LATE = "late"
STILL_INVALID = "still invalid"
SKIPPED = "already re-driven"


@dataclass
class Plan:
    """Each selected dead letter's expected outcome, and which of them are to be sent."""

    outcomes: dict[tuple[str, int, int], str] = field(default_factory=dict)
    details: Counter[str] = field(default_factory=Counter)
    send: list[DeadLetterRow] = field(default_factory=list)

    def summary(self) -> list[tuple[str, int]]:
        return sorted(self.details.items(), key=lambda kv: (-kv[1], kv[0]))


def plan(
    store: Backend,
    rows: Sequence[DeadLetterRow],
    meters: Sequence[MeterConfig],
    limits: Limits,
    group: str,
    horizon_ms: int,
    again: bool = False,
) -> Plan:
    """What re-driving `rows` would do now, classified with the current configuration, the
    watermark recorded with each partition's latest range, and the ledger. A prediction:
    events consumed meanwhile move the watermarks on."""
    by_event = {m.event_name: m for m in meters}
    out = Plan()
    marks = _watermarks(store, group, rows)
    fresh: list[tuple[DeadLetterRow, MeterConfig]] = []
    for d in rows:
        if any(state == SENT for _, state, _, _ in d.redrives) and not again:
            out.details[SKIPPED] += 1
            continue
        out.send.append(d)
        key = (d.topic, d.partition, d.offset)
        if d.event is None:
            out.outcomes[key] = STILL_INVALID
            out.details[f"{STILL_INVALID}: {d.reason}"] += 1
            continue
        try:
            meter = validate(d.event, d.record_time_ms, by_event, limits)
        except Invalid as exc:
            out.outcomes[key] = STILL_INVALID
            out.details[f"{STILL_INVALID}: {exc.reason}"] += 1
            continue
        fresh.append((d, meter))
    held = _in_ledger(store, fresh, horizon_ms)
    for i, (d, meter) in enumerate(fresh):
        key = (d.topic, d.partition, d.offset)
        assert d.event is not None
        ts = d.event.timestamp_ms
        mark = marks.get((d.partition, meter.name))
        if i in held and not d.event.cancels:
            outcome = DUPLICATE
        elif d.event.cancels:
            outcome = COUNTS
        elif mark is not None and ts < mark - meter.allowed_lateness_seconds * 1000:
            outcome = LATE
        else:
            outcome = COUNTS
            # the copies are produced in this order: each moves its partition's mark on
            marks[(d.partition, meter.name)] = ts if mark is None else max(mark, ts)
        out.outcomes[key] = outcome
        out.details[_said(outcome, meter)] += 1
    return out


def _said(outcome: str, meter: MeterConfig) -> str:
    if outcome == COUNTS:
        return f"counts in {meter.name}"
    if outcome == DUPLICATE:
        return f"already counted in {meter.name} (a duplicate)"
    return (
        f"late for {meter.name}: older than its watermark by more than "
        f"allowed_lateness_seconds={meter.allowed_lateness_seconds}; goes to the late topic, "
        "not the totals"
    )


def _watermarks(
    store: Backend, group: str, rows: Sequence[DeadLetterRow]
) -> dict[tuple[int, str], int]:
    """(partition, meter) -> the watermark recorded with the partition's latest range."""
    out: dict[tuple[int, str], int] = {}
    topics: dict[str, set[int]] = {}
    for d in rows:
        topics.setdefault(d.topic, set()).add(d.partition)
    for topic, partitions in topics.items():
        for p, st in load_states(store, group, topic, sorted(partitions)).items():
            for meter, mark in Snapshot.from_json(st.snapshot).watermarks.items():
                out[(p, meter)] = mark
    return out


def _in_ledger(
    store: Backend, fresh: Sequence[tuple[DeadLetterRow, MeterConfig]], horizon_ms: int
) -> set[int]:
    if not fresh:
        return set()
    n = len(fresh)
    events = [d.event for d, _ in fresh]
    candidates = pa.table(
        [
            pa.array(range(n), pa.uint32()),
            pa.array([m.name for _, m in fresh]),
            pa.array([e.event_id if e else "" for e in events]),
            pa.array([e.timestamp_ms if e else 0 for e in events], pa.int64()),
            pa.array([""] * n),  # no range of its own to ignore (P2)
            pa.array([""] * n),
            pa.array([0] * n, pa.uint32()),
            pa.array([0] * n, pa.uint64()),
            pa.array([0] * n, pa.uint64()),
            pa.array([False] * n),
        ],
        schema=CANDIDATE_SCHEMA,
    )
    return set(ledger_lookup(store, horizon_ms)(candidates))


def run_id(now_ms: int, rows: Sequence[DeadLetterRow]) -> str:
    """A re-drive run's id: when, and what it selected."""
    h = hashlib.sha256(f"{now_ms}".encode())
    for d in rows[:1000]:
        h.update(f"{d.topic}/{d.partition}/{d.offset};".encode())
    return f"rd-{now_ms}-{h.hexdigest()[:8]}"


def send(
    store: Backend,
    producer: Producer,
    rows: Sequence[DeadLetterRow],
    redrive: str,
    now_ms: Callable[[], int],
    progress: Progress,
    chunk: int = CHUNK,
    flush_timeout: float = 30.0,
) -> int:
    """Produce each row's original message again, recorded before and after; returns how
    many were sent. A produce the broker did not confirm raises DlqError: a re-run resumes
    (what was recorded as sent is skipped)."""
    who = operator()
    done = 0
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        _record(store, part, redrive, INTENDED, {}, who, now_ms())
        crash_points.reached("redrive_after_intent")
        where = _produce(producer, part, redrive, flush_timeout)
        crash_points.reached("redrive_after_produce")
        _record(store, part, redrive, SENT, where, who, now_ms())
        crash_points.reached("redrive_after_record")
        done += len(part)
        if done < len(rows):  # the caller draws the last
            progress(done)
    return done


def _produce(
    producer: Producer, rows: Sequence[DeadLetterRow], redrive: str, timeout: float
) -> dict[tuple[str, int, int], tuple[int, int]]:
    where: dict[tuple[str, int, int], tuple[int, int]] = {}
    errors: list[str] = []

    def confirmed(d: DeadLetterRow) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                errors.append(err.str())
            else:
                where[(d.topic, d.partition, d.offset)] = (
                    int(msg.partition() or 0),
                    int(msg.offset() or 0),
                )

        return on_delivery

    for d in rows:
        link = f"{d.topic}/{d.partition}/{d.offset}".encode()
        headers: list[tuple[str, str | bytes | None]] = [
            (k, v) for k, v in d.headers if k not in (REDRIVE_OF, REDRIVE_ID)
        ]
        headers += [(REDRIVE_OF, link), (REDRIVE_ID, redrive.encode())]
        while True:
            try:
                producer.produce(
                    d.topic,
                    value=d.payload,
                    key=d.key or None,
                    partition=d.partition,  # where the producer put it, with its other copies
                    timestamp=d.record_time_ms,  # judged by its own record time, as before
                    headers=headers,
                    on_delivery=confirmed(d),
                )
                break
            except BufferError:
                producer.poll(0.1)
    remaining = producer.flush(timeout)
    if remaining or errors:
        detail = errors[0] if errors else f"{remaining} messages not confirmed"
        raise DlqError(f"re-drive produce failed: {detail}; run it again to resume")
    return where


def _record(
    store: Backend,
    rows: Sequence[DeadLetterRow],
    redrive: str,
    state: int,
    where: dict[tuple[str, int, int], tuple[int, int]],
    who: str,
    at_ms: int,
) -> None:
    n = len(rows)
    copies = [where.get((d.topic, d.partition, d.offset), (-1, -1)) for d in rows]
    store.insert_columns(
        "dlq_redrives",
        {
            "topic": pa.array([d.topic for d in rows]),
            "partition": pa.array([d.partition for d in rows], pa.uint32()),
            "offset": pa.array([d.offset for d in rows], pa.uint64()),
            "redrive_id": pa.array([redrive] * n),
            "state": pa.array([state] * n, pa.uint8()),
            "reason": pa.array([d.reason for d in rows]),
            "copy_partition": pa.array([p for p, _ in copies], pa.int32()),
            "copy_offset": pa.array([o for _, o in copies], pa.int64()),
            "who": pa.array([who] * n),
            "at": pa.array([at_ms] * n, pa.timestamp("ms", tz="UTC")),
        },
    )


def operator() -> str:
    """Who runs the command, as recorded with a re-drive or a release."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""
