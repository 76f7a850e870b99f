"""What the run-path fuzz checks once the consumer is drained and stopped: dead letters (table
and topic) and late events by coordinates, the ledger, usage_hourly and Stripe's totals,
each against the oracle's expectation (tests/fuzz/messages.py `Expected`). Each check
returns its differences, a few shown with the messages' kinds and bytes; none: []."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from consumer.store.chdb import ChdbBackend
from tests.fuzz.messages import Coord, Expected, HourKey, Message
from tests.fuzz.model import METERS

TOPIC, DLQ, LATE = "fuzz.events", "fuzz.dlq", "fuzz.late"
HEADER = "usage-consumer."
SHOWN = 5  # differences shown per check


def _read_topic(bootstrap: str, topic: str, want: int, timeout: float = 30) -> list[Any]:
    """Every message of a one-partition topic, read from its start without a group commit."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"fuzz-read-{topic}",
            "enable.auto.commit": False,
        }
    )
    c.assign([TopicPartition(topic, 0, 0)])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < want and time.monotonic() < deadline:
            for m in c.consume(1000, 0.5):
                if m.error() is None:
                    out.append(m)
    finally:
        c.close()
    return out


def _diff(
    what: str, want: set[Any], got: set[Any], show: Callable[[Any], Any] = lambda x: x
) -> list[str]:
    missing, extra = sorted(want - got), sorted(got - want)
    if not missing and not extra:
        return []
    return [
        f"{what}: {len(missing)} missing {[show(x) for x in missing[:SHOWN]]}, "
        f"{len(extra)} extra {[show(x) for x in extra[:SHOWN]]}"
    ]


def _diff_totals(what: str, want: dict[Any, Decimal], got: dict[Any, Decimal]) -> list[str]:
    keys = sorted(
        k for k in set(want) | set(got) if want.get(k, Decimal(0)) != got.get(k, Decimal(0))
    )
    if not keys:
        return []
    shown = [f"{k!r}: want {want.get(k, 0)} got {got.get(k, 0)}" for k in keys[:SHOWN]]
    return [f"{what}: {len(keys)} keys differ: {'; '.join(shown)}"]


def check_store(home: Path, expected: Expected, by_coord: dict[Coord, Message]) -> list[str]:
    store = ChdbBackend(home / "chdb", "usage")
    try:
        dead = store.query(
            "SELECT partition, offset, reason FROM dead_letters FINAL WHERE topic = {t:String}",
            {"t": TOPIC},
        )
        late = store.query(
            "SELECT partition, offset FROM late_events FINAL WHERE topic = {t:String}", {"t": TOPIC}
        )
        ledger = store.query(
            """SELECT meter, event_id, customer_id, toString(value),
                      toUnixTimestamp64Milli(event_time) FROM usage_events FINAL"""
        )
        hourly = store.query(
            """SELECT customer_id, meter, toUnixTimestamp(hour), toString(sum_value),
                      toString(last_value) FROM usage_hourly"""
        )
    finally:
        store.close()

    def show(coord: Coord) -> tuple[Coord, str, str, bytes | None]:
        m = by_coord[coord]
        return coord, m.what, m.verdict.why, None if m.value is None else m.value[:80]

    problems = _diff("dead_letters", expected.dead, {(int(p), int(o)) for p, o, _ in dead}, show)
    blank = [(int(p), int(o)) for p, o, r in dead if not str(r).strip()]
    if blank:
        problems.append(f"dead letters without a reason: {blank[:SHOWN]}")
    problems += _diff("late_events", expected.late, {(int(p), int(o)) for p, o in late}, show)
    want_ledger = {
        (e.meter, e.event_id, e.customer_id, e.value, e.timestamp_ms)
        for e in expected.accepted.values()
    }
    got_ledger = {(str(m), str(i), str(c), Decimal(v), int(t)) for m, i, c, v, t in ledger}
    problems += _diff("ledger rows", want_ledger, got_ledger)
    aggs = {meter: agg for meter, agg in METERS.values()}
    got_hourly: dict[HourKey, Decimal] = {
        (str(c), str(m), int(h)): Decimal(s if aggs[str(m)] == "sum" else last)
        for c, m, h, s, last in hourly
    }
    problems += _diff_totals("usage_hourly", expected.hourly(), got_hourly)
    return problems


def check_dlq(bootstrap: str, expected: Expected) -> list[str]:
    got: set[Coord] = set()
    blank: list[Coord] = []
    for m in _read_topic(bootstrap, DLQ, len(expected.dead)):
        h = {k: v for k, v in m.headers() or []}
        coord = (int(h[HEADER + "source-partition"]), int(h[HEADER + "source-offset"]))
        got.add(coord)
        if not (h.get(HEADER + "reason") or b"").strip():
            blank.append(coord)
    problems = _diff("dead-letter topic", expected.dead, got)
    return problems + ([f"dead-letter topic: no reason for {blank[:SHOWN]}"] if blank else [])


def check_stripe(url: str, expected: Expected) -> list[str]:
    with urllib.request.urlopen(f"{url}/_emulator/state", timeout=10) as r:
        state = json.loads(r.read())
    got = {(t["customer"], t["event_name"]): Decimal(t["value"]) for t in state["totals"]}
    return _diff_totals("Stripe", expected.stripe(), {k: v for k, v in got.items() if v})
