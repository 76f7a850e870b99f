"""A realistic, seeded sample with known ground truth: the demo's and the tests' dataset.

Each message is labelled with what it is meant to be (accepted, duplicate, late, future,
invalid, undecodable, cancel); the ground truth is computed from those labels, independently of
the consumer's code, so the comparison at the end of a run means something.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from consumer.decode.schemas import SCHEMAS_DIR, load_schema, reader_schema
from consumer.decode.wire import encode_confluent, frame_confluent
from consumer.exact import EXACT
from consumer.producer import event_record, message_key

METERS = {  # event_name -> (meter name, aggregation, share of events)
    "api_call": ("api_calls", "sum", 0.60),
    "tokens": ("tokens", "sum", 0.25),
    "storage_gb": ("storage_gb", "last", 0.15),
}
HOUR_MS = 3_600_000
CANCEL_SHARE = 0.003  # of the sum meters' events, cancelled by a later event


@dataclass(frozen=True)
class Message:
    key: bytes | None
    value: bytes
    partition: int
    kind: str  # accepted | duplicate | late | future | invalid | undecodable | cancel
    event_id: str = ""
    # Kafka CreateTime: the sample's "now". The consumer judges an event's time against its
    # record's time, so a message produced long after generation still means what it was
    # generated to mean (a future-dated one stays future-dated).
    record_time_ms: int | None = None


@dataclass
class Sample:
    messages: list[Message]
    truth: dict[tuple[str, str], Decimal]  # (customer, meter) -> total (sum) or last value
    kinds: Counter[str] = field(default_factory=Counter)
    customers: int = 0
    accepted_ids: set[str] = field(default_factory=set)
    late_ids: set[str] = field(default_factory=set)
    # (customer, meter, hour start in epoch seconds) -> the hour's sum or last value
    truth_hourly: dict[tuple[str, str, int], Decimal] = field(default_factory=dict)

    @property
    def meters(self) -> int:
        return len({m for _, m in self.truth})


@dataclass
class _Event:
    event_id: str
    event_name: str
    customer: str
    value: Decimal
    ts: int


def _value(rng: random.Random, event_name: str) -> Decimal:
    if event_name == "api_call":
        return Decimal(rng.choice([1, 1, 1, 1, 2, 5, 10]))
    if event_name == "tokens":
        return Decimal(rng.randint(1, 5000))
    return Decimal(rng.randint(1000, 500_000)) / 1000  # GB with 3 decimals


def generate(
    n: int,
    customers: int,
    partitions: int,
    now_ms: int,
    seed: int = 7,
    span_ms: int = 4 * HOUR_MS,
    customer_prefix: str = "cus_",
    cancels: bool = False,
    restamped: float = 0.0,
) -> Sample:
    """`n` accepted events plus ~1% duplicates (some in another partition, half of those
    re-stamped a minute apart), late, future, invalid and undecodable ones;
    with `cancels`, 0.3% of the sum meters' events are cancelled by a later event; with
    `restamped`, that share of the sum meters' events also gets a copy re-stamped a minute
    later right behind it in the next partition (a producer's retry racing its original)."""
    rng = random.Random(seed)
    v1 = load_schema(SCHEMAS_DIR / "usage_event.v1.avsc")
    v2 = load_schema(SCHEMAS_DIR / "usage_event.v2.avsc")
    v4 = reader_schema()
    cancelled: set[str] = set()
    cust = [f"{customer_prefix}{i:04d}" for i in range(customers)]
    names = list(METERS)
    weights = [METERS[k][2] for k in names]
    start = now_ms - span_ms - 10 * 60_000
    step = span_ms / n
    messages: list[Message] = []
    accepted: list[tuple[_Event, Message]] = []
    truth: dict[tuple[str, str], Decimal] = {}
    hourly: dict[tuple[str, str, int], Decimal] = {}
    last_seen: dict[Any, tuple[int, str]] = {}

    def encode(ev: _Event, kind: str, old_schema: bool = False) -> Message:
        rec = event_record(
            ev.event_id,
            ev.event_name,
            ev.customer,
            ev.value,
            ev.ts,
            {"region": rng.choice(["eu", "us"])},
        )
        if old_schema:
            rec.pop("properties")
            payload = encode_confluent(rec, v1, 1)
        else:
            payload = encode_confluent(rec, v2, 2)
        key = message_key(ev.event_name, ev.event_id)
        return Message(key, payload, zlib.crc32(key) % partitions, kind, ev.event_id, now_ms)

    for i in range(n):
        name = rng.choices(names, weights)[0]
        jitter = 0 if name == "storage_gb" else rng.randint(-30_000, 30_000)
        ev = _Event(
            f"evt-{customer_prefix}{seed}-{i:08d}",
            name,
            rng.choice(cust),
            _value(rng, name),
            int(start + i * step) + jitter,
        )
        msg = encode(ev, "accepted", old_schema=rng.random() < 0.1)
        messages.append(msg)
        accepted.append((ev, msg))
        meter, agg, _ = METERS[name]
        _account(truth, last_seen, (ev.customer, meter), agg, ev)
        hour = ev.ts // HOUR_MS * 3600
        _account(hourly, last_seen, (ev.customer, meter, hour), agg, ev)
        messages.extend(_extras(rng, i, n, ev, accepted, encode, partitions, now_ms))
        if restamped and name != "storage_gb" and rng.random() < restamped:
            shift = 60_000 if ev.ts % HOUR_MS < HOUR_MS - 60_000 else -60_000
            copy = encode(replace(ev, ts=ev.ts + shift), "duplicate")
            messages.append(replace(copy, partition=(msg.partition + 1) % partitions))
        if cancels and name != "storage_gb" and rng.random() < CANCEL_SHARE:
            target, _ = accepted[rng.randrange(max(0, len(accepted) - 2000), len(accepted))]
            if target.event_name != "storage_gb" and target.event_id not in cancelled:
                cancelled.add(target.event_id)
                t_meter = METERS[target.event_name][0]
                truth[(target.customer, t_meter)] -= target.value
                hourly[(target.customer, t_meter, target.ts // HOUR_MS * 3600)] -= target.value
                rec = event_record(
                    f"{target.event_id}-cancel", target.event_name, target.customer, 0, ev.ts,
                    cancels=target.event_id,
                )  # fmt: skip
                key = message_key(target.event_name, rec["event_id"])
                payload = encode_confluent(rec, v4, 4)
                messages.append(
                    Message(key, payload, zlib.crc32(key) % partitions, "cancel", "", now_ms)
                )
    messages.extend(_undecodable(rng, partitions, now_ms))
    kinds = Counter(m.kind for m in messages)
    ids = {ev.event_id for ev, _ in accepted}
    late_ids = {m.event_id for m in messages if m.kind == "late" and m.event_id}
    return Sample(messages, truth, kinds, customers, ids, late_ids, hourly)


def _account(
    totals: dict[Any, Decimal],
    last_seen: dict[Any, tuple[int, str]],
    key: Any,
    agg: str,
    ev: _Event,
) -> None:
    """Ground truth from the labels: sums add, `last` keeps the latest (time, event id)."""
    if agg == "sum":
        totals[key] = EXACT.add(totals.get(key, Decimal(0)), ev.value)
    elif (ev.ts, ev.event_id) > last_seen.get(key, (-1, "")):
        last_seen[key] = (ev.ts, ev.event_id)
        totals[key] = ev.value


def _extras(
    rng: random.Random,
    i: int,
    n: int,
    ev: _Event,
    accepted: list[tuple[_Event, Message]],
    encode: object,
    partitions: int,
    now_ms: int,
) -> Iterator[Message]:
    """After event i: maybe a duplicate, a late, a future-dated or an invalid event."""
    assert callable(encode)
    r = rng.random()
    if r < 0.01 and accepted:
        src, orig = accepted[rng.randrange(max(0, len(accepted) - 5000), len(accepted))]
        other = rng.random() < 0.3  # a duplicate in a different partition
        if other and rng.random() < 0.5:
            # a recent event (likely read in the same batch as the copy), re-stamped by its
            # producer into another minute of the same hour (the truth is hourly)
            src, orig = accepted[-rng.randint(1, min(10, len(accepted)))]
            if src.event_name != "storage_gb":
                shift = 60_000 if src.ts % HOUR_MS < HOUR_MS - 60_000 else -60_000
                orig = encode(replace(src, ts=src.ts + shift), "duplicate")
        part = (orig.partition + 1) % partitions if other else orig.partition
        yield replace(orig, partition=part, kind="duplicate", event_id="")
    elif r < 0.013 and i > 0.6 * n and ev.event_name != "storage_gb":
        late = _Event(
            ev.event_id + "-late", ev.event_name, ev.customer, ev.value, ev.ts - 3 * HOUR_MS
        )
        yield encode(late, "late")
    elif r < 0.014:
        fut = _Event(
            ev.event_id + "-future", ev.event_name, ev.customer, ev.value, now_ms + 20 * 60_000
        )
        yield encode(fut, "future")
    elif r < 0.0145:
        bad = _Event(ev.event_id + "-neg", ev.event_name, ev.customer, Decimal(-5), ev.ts)
        yield encode(bad, "invalid")
    elif r < 0.015:
        unknown = _Event(ev.event_id + "-unk", "legacy_metric", ev.customer, ev.value, ev.ts)
        yield encode(unknown, "invalid")


def _undecodable(rng: random.Random, partitions: int, now_ms: int) -> list[Message]:
    bad = [
        b"",
        b"\x01\x00\x00\x00\x02garbage",  # bad magic byte
        b"\x00\x00\x00",  # truncated header
        frame_confluent(99, b"\x02a"),  # unknown schema id
        frame_confluent(2, bytes(rng.getrandbits(8) for _ in range(12))),  # not Avro
        b"not avro at all",
    ]
    return [Message(None, v, i % partitions, "undecodable", "", now_ms) for i, v in enumerate(bad)]
