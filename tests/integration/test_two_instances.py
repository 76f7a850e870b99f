"""The same event ids in two partitions, owned by two instances (same process, one chDB
store, one emitter).

Producers key by event id, so copies normally share a partition; a producer that sets the
partition itself (or a topic whose partition count changed) breaks that, and the keyed
ledger is then the only thing between a retry and a double bill. Two phases:

1. Interleaved on one thread: chunk i of the ids goes to both partitions, one instance
   writes its copy, then the other writes its copy milliseconds later (the order alternates
   from chunk to chunk), so "which copy came second" is well defined.
2. Concurrent: both instances run their poll loops in their own threads while every event
   is produced to both partitions back to back; both copies are classified and written at
   about the same time (neither can see the other: only the ledger's key collapses them).

Every unit must count once in the ledger, the windows and the emulator; every copy is
classified exactly once; and in phase 1 the copy that came second is a duplicate.

3. Re-stamped: the same ids once more in both partitions, the second copy with a timestamp
   61 minutes later (a producer retry that stamped the event again): same meter, same
   event id, so the same unit. It must count once, in the hour of the copy written first.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest

from consumer.app import Pipeline, build_pipeline
from consumer.clock import SystemClock
from consumer.config import Settings
from consumer.decode.schemas import reader_schema
from consumer.decode.wire import encode_confluent
from consumer.exact import EXACT
from consumer.local.broker import TansuBroker
from consumer.local.demo import stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.metrics import Metrics
from consumer.ops.health import Health
from consumer.ops.totals import Totals, clickhouse_totals
from consumer.producer import CURRENT_SCHEMA_ID, UsageProducer, event_record, message_key
from consumer.store import Backend, open_store
from tests.integration.conftest import (
    clickhouse_hourly,
    counter_total,
    ledger_totals,
    make_settings,
    stripe_hourly,
    wait_for,
    wait_outbox_drained,
)
from tests.integration.test_pipeline import ours

pytestmark = pytest.mark.integration

NAME = "twoinst"
PREFIX = f"cus_{NAME}_"
PREFIX3 = f"cus_{NAME}3_"  # phase 3's customers, checked on their own
RESTAMPED, RESTAMP_MS = 60, 61 * 60_000
CHUNKS, CHUNK = 6, 40  # phase 1: 240 ids, each in both partitions
CONCURRENT = 400  # phase 2: 400 more ids, each in both partitions
EVENTS = {"api_call": "api_calls", "tokens": "tokens", "storage_gb": "storage_gb"}
HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Ev:
    event_id: str
    event_name: str
    customer: str
    value: Decimal
    ts: int


@dataclass
class Seen:
    """One set of customers as ClickHouse and the emulator saw them."""

    ledger_rows: int = 0
    ledger: Totals = field(default_factory=dict)
    windows: Totals = field(default_factory=dict)
    hourly: dict[tuple[str, str, int], Decimal] = field(default_factory=dict)
    stripe: Totals = field(default_factory=dict)
    stripe_hours: dict[tuple[str, str, int], Decimal] = field(default_factory=dict)


@dataclass
class Outcome:
    settings: Settings
    events: list[Ev]
    restamped: list[Ev]  # phase 3: the copies written first
    owners: dict[str, set[int]]  # instance -> partitions it owned while the copies went in
    # phase 1, per chunk: (instance that wrote second, its duplicates, its accepted) deltas
    second: list[tuple[str, float, float]] = field(default_factory=list)
    phase1: dict[str, tuple[float, float]] = field(default_factory=dict)  # (accepted, dupes)
    phase2: dict[str, tuple[float, float]] = field(default_factory=dict)
    phase3: dict[str, tuple[float, float]] = field(default_factory=dict)
    seen: Seen = field(default_factory=Seen)
    seen3: Seen = field(default_factory=Seen)


def make_events(
    n: int, start: int, rng: random.Random, base: int, step_ms: int, prefix: str = PREFIX
) -> list[Ev]:
    out = []
    for i in range(start, start + n):
        name = rng.choice(list(EVENTS))
        value = Decimal(rng.randint(1, 50)) / (1000 if name == "storage_gb" else 1)
        ts = base + (i - start) * step_ms
        out.append(Ev(f"same-{i:05d}", name, f"{prefix}{rng.randrange(4)}", value, ts))
    return out


def truth(events: list[Ev]) -> Totals:
    out: Totals = {}
    last: dict[tuple[str, str], tuple[int, str]] = {}
    for e in events:
        key = (e.customer, EVENTS[e.event_name])
        if e.event_name != "storage_gb":
            out[key] = EXACT.add(out.get(key, Decimal(0)), e.value)
        elif (e.ts, e.event_id) > last.get(key, (-1, "")):
            last[key], out[key] = (e.ts, e.event_id), e.value
    return out


def truth_hourly(events: list[Ev]) -> dict[tuple[str, str, int], Decimal]:
    by_hour: dict[int, list[Ev]] = {}
    for e in events:
        by_hour.setdefault(e.ts // HOUR_MS * 3600, []).append(e)
    return {(c, m, h): v for h, evs in by_hour.items() for (c, m), v in truth(evs).items()}


class Both:
    """Produces every event into partition 0 and partition 1; remembers the end offsets."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.producer = UsageProducer({"bootstrap.servers": bootstrap}, topic)
        self.ends: dict[int, int] = {}
        self.schema = reader_schema()

    def send(self, events: list[Ev], partitions: tuple[int, ...] = (0, 1)) -> dict[int, int]:
        failures: list[str] = []

        def delivered(err: object, msg: object) -> None:
            if err is not None:
                failures.append(str(err))
                return
            p, o = msg.partition(), msg.offset()  # type: ignore[attr-defined]
            self.ends[p] = max(self.ends.get(p, 0), o + 1)

        for e in events:
            rec = event_record(e.event_id, e.event_name, e.customer, e.value, e.ts)
            payload = encode_confluent(rec, self.schema, CURRENT_SCHEMA_ID)
            for partition in partitions:
                self.producer.send_raw(
                    message_key(e.event_name, e.event_id),
                    payload,
                    partition=partition,
                    on_delivery=delivered,
                )
        assert self.producer.flush(30) == 0 and not failures, failures
        return dict(self.ends)


def two_settings(
    broker: TansuBroker, emulator: EmulatorServer, tmp: Path, name: str
) -> tuple[Settings, Settings]:
    """A test's settings for instance A and for B (Stripe off), and its 2-partition topic."""
    settings = make_settings(broker, emulator, tmp, name)
    quiet = make_settings(broker, emulator, tmp, name, stripe={"enabled": False})
    k = settings.kafka
    broker.create_topics({k.topic: 2, k.dlq_topic: 1, k.late_topic: 1})
    return settings, quiet


def two_pipelines(settings: Settings, quiet: Settings, store: Backend) -> dict[str, Pipeline]:
    """Instance A (with the emitter) and B (Stripe off) on one store, as in one process."""
    clock = SystemClock()
    return {
        "A": build_pipeline(settings, clock, Metrics(), Health(clock), store),
        "B": build_pipeline(quiet, clock, Metrics(), Health(clock), store),
    }


def split_partitions(pipes: dict[str, Pipeline]) -> dict[str, set[int]]:
    """Step both instances until cooperative-sticky gave each one partition."""
    deadline = time.monotonic() + 60
    while not all(len(p.ingestor.tracks) == 1 for p in pipes.values()):
        assert time.monotonic() < deadline, "the two instances never split the partitions"
        for p in pipes.values():
            p.ingestor.step()
    owners = {n: set(p.ingestor.tracks) for n, p in pipes.items()}
    for n, p in pipes.items():
        assert {tp.partition for tp in p.consumer.assignment()} == owners[n]
        owned = p.metrics.registry.get_sample_value("usage_consumer_partitions_owned")
        assert owned == 1  # what an operator sees of the split
    return owners


def poll_loops(
    pipes: dict[str, Pipeline], halt: threading.Event, errors: list[BaseException]
) -> list[threading.Thread]:
    """A thread a pipeline stepping its poll loop until `halt`; failures land in `errors`."""

    def loop(p: Pipeline) -> None:
        try:
            while not halt.is_set():
                p.ingestor.step()
        except BaseException as exc:
            errors.append(exc)

    return [threading.Thread(target=loop, args=(p,)) for p in pipes.values()]


def counts(p: Pipeline) -> tuple[float, float]:
    return counter_total(p.metrics.events_accepted), counter_total(p.metrics.events_duplicate)


def committed(p: Pipeline, ends: dict[int, int]) -> bool:
    return all(
        p.ingestor.committed.get(q, -1) >= e for q, e in ends.items() if q in p.ingestor.tracks
    )


def step_until_committed(p: Pipeline, ends: dict[int, int], timeout: float = 60) -> None:
    """Drive one instance alone (on this thread) until it committed its partition's end."""
    deadline = time.monotonic() + timeout
    while not committed(p, ends):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {set(p.ingestor.tracks)} to commit")
        p.ingestor.step()


def delta(now: tuple[float, float], then: tuple[float, float]) -> tuple[float, float]:
    return now[0] - then[0], now[1] - then[1]


def read(store: Backend, settings: Settings, url: str, prefix: str) -> Seen:
    meters = settings.meters
    rows = store.query(
        "SELECT count() FROM usage_events FINAL WHERE startsWith(customer_id, {p:String})",
        {"p": prefix},
    )
    return Seen(
        int(rows[0][0]),
        ledger_totals(store, meters, prefix),
        ours(clickhouse_totals(store, meters), prefix),
        clickhouse_hourly(store, meters, prefix),
        ours(stripe_totals(settings, url), prefix),
        stripe_hourly(url, meters, prefix),
    )


@pytest.fixture(scope="module")
def outcome(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Outcome]:
    settings, quiet = two_settings(broker, emulator, tmp_path_factory.mktemp(NAME), NAME)
    k = settings.kafka
    rng = random.Random(23)
    base = int(time.time() * 1000) - 40 * 60_000
    phase1 = make_events(CHUNKS * CHUNK, 0, rng, base, 3000)
    phase2 = make_events(CONCURRENT, len(phase1), rng, phase1[-1].ts + 3000, 3000)
    # Phase 3 starts 55 minutes before the newest event so far (within the allowed hour of
    # lateness); its re-stamped copies end up 6 minutes past it (within the 5 minutes of
    # future tolerance, as they are produced minutes later than the newest event's stamp).
    first3 = make_events(RESTAMPED, 50_000, rng, phase2[-1].ts - 55 * 60_000, 100, PREFIX3)
    again3 = [dataclasses.replace(e, ts=e.ts + RESTAMP_MS) for e in first3]
    store = open_store(settings.clickhouse)
    pipes = two_pipelines(settings, quiet, store)
    a, b = pipes["A"], pipes["B"]
    assert a.emitter is not None
    stop = threading.Event()
    emitter = threading.Thread(target=a.emitter.run, args=(stop,), name="emitter")
    emitter.start()
    both = Both(broker.bootstrap, k.topic)
    loops: list[threading.Thread] = []
    try:
        owners = split_partitions(pipes)
        out = Outcome(settings, phase1 + phase2, first3, owners)

        # Phase 1: the copies of each chunk go in one right after the other.
        for i in range(CHUNKS):
            ends = both.send(phase1[i * CHUNK : (i + 1) * CHUNK])
            first, second = ("A", "B") if i % 2 == 0 else ("B", "A")
            step_until_committed(pipes[first], ends)
            before = counts(pipes[second])
            step_until_committed(pipes[second], ends)
            accepted, dupes = delta(counts(pipes[second]), before)
            out.second.append((second, dupes, accepted))
        out.phase1 = {n: counts(p) for n, p in pipes.items()}

        # Phase 2: both poll loops run at once while every event lands in both partitions.
        halt = threading.Event()
        errors: list[BaseException] = []
        loops = poll_loops(pipes, halt, errors)
        for t in loops:
            t.start()
        ends = both.send(phase2)
        wait_for(lambda: all(committed(p, ends) for p in pipes.values()) or bool(errors), "both")
        halt.set()
        for t in loops:
            t.join(60)
        assert not errors, errors
        assert {n: set(p.ingestor.tracks) for n, p in pipes.items()} == owners
        done2 = {n: counts(p) for n, p in pipes.items()}
        out.phase2 = {n: delta(done2[n], out.phase1[n]) for n, p in pipes.items()}

        # Phase 3: A's copies first, then B's re-stamped copies of the same ids.
        ends = both.send(first3, tuple(owners["A"]))
        step_until_committed(a, ends)
        ends = both.send(again3, tuple(owners["B"]))
        step_until_committed(b, ends)
        out.phase3 = {n: delta(counts(p), done2[n]) for n, p in pipes.items()}

        wait_outbox_drained(a)
        out.seen = read(store, settings, emulator.url, PREFIX)
        out.seen3 = read(store, settings, emulator.url, PREFIX3)
        yield out
    finally:
        stop.set()
        emitter.join(60)
        a.emitter.close()
        for p in pipes.values():
            p.close()
        store.close()


def test_the_partitions_are_split_between_the_instances(outcome: Outcome) -> None:
    assert outcome.owners["A"] | outcome.owners["B"] == {0, 1}
    assert len(outcome.owners["A"]) == len(outcome.owners["B"]) == 1


def check_counted_once(seen: Seen, events: list[Ev]) -> None:
    assert seen.ledger_rows == len(events)
    assert seen.ledger == truth(events)
    assert seen.windows == truth(events)
    assert seen.hourly == truth_hourly(events)
    assert seen.stripe == truth(events)
    assert seen.stripe_hours == truth_hourly(events)


def test_each_unit_counts_once_in_clickhouse_and_stripe(outcome: Outcome) -> None:
    check_counted_once(outcome.seen, outcome.events)


def test_every_copy_is_classified_exactly_once(outcome: Outcome) -> None:
    n1, n2 = CHUNKS * CHUNK, CONCURRENT
    for phase, n in ((outcome.phase1, n1), (outcome.phase2, n2)):
        accepted = sum(a for a, _ in phase.values())
        dupes = sum(d for _, d in phase.values())
        assert accepted + dupes == 2 * n
        assert accepted >= n  # a copy is never dropped as a duplicate of nothing


def test_the_copy_that_came_second_is_a_duplicate(outcome: Outcome) -> None:
    """Phase 1: the second instance wrote after the first's copy was in the ledger, so it
    must classify its copy as a duplicate (and not count it as accepted)."""
    assert outcome.second == [
        ("B" if i % 2 == 0 else "A", float(CHUNK), 0.0) for i in range(CHUNKS)
    ]
    accepted = sum(a for a, _ in outcome.phase1.values())
    dupes = sum(d for _, d in outcome.phase1.values())
    assert (accepted, dupes) == (CHUNKS * CHUNK, CHUNKS * CHUNK)


def test_a_re_stamped_copy_in_the_other_partition_counts_once(outcome: Outcome) -> None:
    """Dedup is by (meter, event id): a second copy stamped an hour later is the same unit,
    whatever partition it arrives in, and counts in the first copy's hour."""
    assert outcome.phase3["A"] == (RESTAMPED, 0)
    check_counted_once(outcome.seen3, outcome.restamped)
    assert outcome.phase3["B"] == (0, RESTAMPED)
