"""End to end on real local services: Tansu, chDB and the Stripe emulator."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Message, TopicPartition

from consumer.app import EmitterFailed, build_pipeline
from consumer.clock import SystemClock
from consumer.config import Settings
from consumer.ingest.loop import DeadLetterFlood
from consumer.intent.state import load_states
from consumer.local.broker import TansuBroker
from consumer.local.demo import produce, run_until_drained, stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.local.sample import Sample, generate
from consumer.metrics import Metrics
from consumer.ops.health import Health
from consumer.ops.totals import Totals, clickhouse_totals, side_counts
from consumer.producer import UsageProducer
from consumer.store import open_store
from tests.integration.conftest import make_settings, produce_sample

pytestmark = pytest.mark.integration


def setup(broker: TansuBroker, settings: Settings, partitions: int = 3) -> None:
    k = settings.kafka
    broker.create_topics({k.topic: partitions, k.dlq_topic: 1, k.late_topic: 1})


def ours(totals: Totals, prefix: str) -> Totals:
    return {k: v for k, v in totals.items() if k[0].startswith(prefix)}


def ch_totals(settings: Settings) -> tuple[Totals, dict[str, int]]:
    store = open_store(settings.clickhouse)
    try:
        return clickhouse_totals(store, settings.meters), side_counts(store)
    finally:
        store.close()


def check_exact(settings: Settings, emulator: EmulatorServer, sample: Sample, prefix: str) -> None:
    ch, _ = ch_totals(settings)
    st = ours(stripe_totals(settings, emulator.url), prefix)
    assert ch == sample.truth
    assert st == sample.truth


def emulator_state(emulator: EmulatorServer) -> dict[str, object]:
    with urllib.request.urlopen(f"{emulator.url}/_emulator/state", timeout=5) as r:
        state: dict[str, object] = json.loads(r.read())
        return state


def test_end_to_end_totals_are_exact(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    run = produce_sample(broker, emulator, tmp_path, unique, 20_000, 20, seed=11)
    settings, sample, ends, prefix = run.settings, run.sample, run.ends, run.prefix
    run_until_drained(settings, ends, timeout=120, quiet=True)
    check_exact(settings, emulator, sample, prefix)
    _, sides = ch_totals(settings)
    dead = sum(v for r, v in sides.items() if r != "late")
    assert dead == sample.kinds["invalid"] + sample.kinds["future"] + sample.kinds["undecodable"]
    assert sides["late"] >= len(sample.late_ids) > 0


def test_duplicates_across_batches_and_partitions(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings = make_settings(broker, emulator, tmp_path, unique)
    setup(broker, settings)
    prefix = f"cus_{unique}_"
    sample = generate(3_000, 5, 3, int(time.time() * 1000), seed=5, customer_prefix=prefix)
    clean = [m for m in sample.messages if m.kind == "accepted"]
    sample.messages[:] = clean
    ends = produce(sample, broker.bootstrap, settings.kafka.topic)
    run_until_drained(settings, ends, timeout=120, quiet=True)
    # Later batches: every event again, in its own partition and in another one.
    again = [*clean, *[type(m)(m.key, m.value, (m.partition + 1) % 3, "duplicate") for m in clean]]
    sample.messages[:] = again
    ends2 = produce(sample, broker.bootstrap, settings.kafka.topic)
    metrics = Metrics()
    run_until_drained(settings, ends2, timeout=120, metrics=metrics, quiet=True)
    check_exact(settings, emulator, sample, prefix)
    store = open_store(settings.clickhouse)
    try:
        rows = store.query("SELECT count() FROM usage_events FINAL")
    finally:
        store.close()
    assert int(rows[0][0]) == len(clean)
    dupes = sum(
        s.value
        for metric in metrics.events_duplicate.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    )
    assert dupes >= len(clean)  # every same-partition copy is caught before the write


def test_graceful_stop_and_restart_mid_stream(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    run = produce_sample(broker, emulator, tmp_path, unique, 20_000, 10, seed=3)
    settings, sample, ends, prefix = run.settings, run.sample, run.ends, run.prefix
    first = run_until_drained(
        settings, ends, timeout=120, stop_at=sum(ends.values()) // 3, quiet=True
    )
    assert first < sum(ends.values())
    ch, _ = ch_totals(settings)
    assert ch != sample.truth  # really stopped mid-stream
    metrics = Metrics()
    run_until_drained(settings, ends, timeout=120, metrics=metrics, quiet=True)
    check_exact(settings, emulator, sample, prefix)
    assert metrics.ranges_reformed._value.get() == 0  # a graceful stop leaves no open range


def test_dead_letters_carry_bytes_and_reason_and_offsets_are_committed(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings = make_settings(broker, emulator, tmp_path, unique)
    setup(broker, settings, partitions=1)
    p = UsageProducer({"bootstrap.servers": broker.bootstrap}, settings.kafka.topic)
    bad = [b"\x07junk", b"", b"\x00\x00\x00\x00\x63\x02x"]
    now = int(time.time() * 1000)
    p.send(
        event_id="ok-1",
        event_name="api_call",
        customer_id=f"cus_{unique}",
        value=Decimal(3),
        timestamp_ms=now,
    )
    for payload in bad:
        p.send_raw(b"k", payload)
    p.send(
        event_id="neg-1",
        event_name="api_call",
        customer_id=f"cus_{unique}",
        value=Decimal(-1),
        timestamp_ms=now,
    )
    assert p.flush() == 0
    run_until_drained(settings, {0: 5}, timeout=60, quiet=True)

    c = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": f"{unique}-check",
            "auto.offset.reset": "earliest",
        }
    )
    c.assign([TopicPartition(settings.kafka.dlq_topic, 0, 0)])
    got: list[Message] = []
    deadline = time.monotonic() + 20
    while len(got) < 4 and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and m.error() is None:
            got.append(m)
    committed = c.committed([TopicPartition(settings.kafka.topic, 0)], timeout=10)
    c.close()
    assert [m.value() or b"" for m in got] == [*bad, got[3].value()]
    reasons = [dict(m.headers() or [])["usage-consumer.reason"] for m in got]
    assert reasons == [b"bad_magic", b"empty", b"unknown_schema_id", b"negative_value"]
    offsets = [dict(m.headers() or [])["usage-consumer.source-offset"] for m in got]
    assert offsets == [b"1", b"2", b"3", b"4"]

    probe = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": unique})
    committed = probe.committed([TopicPartition(settings.kafka.topic, 0)], timeout=10)
    probe.close()
    assert committed[0].offset == 5
    store = open_store(settings.clickhouse)
    try:
        rows = store.query("SELECT offset, reason, payload FROM dead_letters FINAL ORDER BY offset")
    finally:
        store.close()
    assert [(int(o), str(r)) for o, r, _ in rows] == [
        (1, "bad_magic"),
        (2, "empty"),
        (3, "unknown_schema_id"),
        (4, "negative_value"),
    ]


def test_session_expiring_during_a_run_is_refreshed(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    run = produce_sample(
        broker,
        emulator,
        tmp_path,
        unique,
        6_000,
        5,
        seed=9,
        stripe={"session_refresh_margin_seconds": 0, "requests_per_second": 50, "concurrency": 2},
    )
    settings, sample, ends, prefix = run.settings, run.sample, run.ends, run.prefix
    stop = threading.Event()

    def expire_repeatedly() -> None:
        while not stop.wait(0.3):
            req = urllib.request.Request(
                f"{emulator.url}/_emulator/expire_sessions", data=b"{}", method="POST"
            )
            urllib.request.urlopen(req, timeout=5).close()

    expirer = threading.Thread(target=expire_repeatedly)
    expirer.start()
    metrics = Metrics()
    try:
        run_until_drained(settings, ends, timeout=180, metrics=metrics, quiet=True)
    finally:
        stop.set()
        expirer.join()
    check_exact(settings, emulator, sample, prefix)
    assert metrics.stripe_sessions.labels("expired")._value.get() >= 1


def test_no_request_carries_more_than_100_events(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings = make_settings(broker, emulator, tmp_path, unique)
    setup(broker, settings, partitions=1)
    before = emulator_state(emulator)
    p = UsageProducer({"bootstrap.servers": broker.bootstrap}, settings.kafka.topic)
    now = int(time.time() * 1000)
    for i in range(1_050):
        p.send(
            event_id=f"{unique}-{i}",
            event_name="tokens",
            customer_id=f"cus_{unique}",
            value=Decimal(1),
            timestamp_ms=now - i,
        )
    assert p.flush() == 0
    metrics = Metrics()
    run_until_drained(settings, {0: 1_050}, timeout=60, metrics=metrics, quiet=True)
    after = emulator_state(emulator)
    requests = after["requests"]["stream"] - before["requests"]["stream"]  # type: ignore[index]
    assert requests >= 11  # 1,050 events at 100 per request at most
    assert stripe_totals(settings, emulator.url)[(f"cus_{unique}", "tokens")] == 1_050
    assert metrics.stripe_events.labels("per_event")._value.get() == 1_050


def test_a_flood_of_invalid_messages_stops_instead_of_dead_lettering(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings = make_settings(
        broker, emulator, tmp_path, unique, pipeline={"invalid_ratio_min_messages": 50}
    )
    setup(broker, settings, partitions=1)
    p = UsageProducer({"bootstrap.servers": broker.bootstrap}, settings.kafka.topic)
    for i in range(120):
        p.send_raw(b"k", b"\x00\x00\x00\x00\x02not-avro-%d" % i)
    assert p.flush() == 0
    clock = SystemClock()
    # Restarts waiting for an operator are not crashes: more of them than
    # pipeline.poison_after_attempts must not split the range into small chunks that
    # slip under invalid_ratio_min_messages.
    for _ in range(settings.pipeline.poison_after_attempts + 1):
        pipeline = build_pipeline(settings, clock, Metrics(), Health(clock))
        try:
            with pytest.raises(DeadLetterFlood, match="120 of 120 messages invalid"):
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    pipeline.ingestor.step()
            assert pipeline.store.query("SELECT count() FROM dead_letters")[0][0] == 0
            state = load_states(pipeline.store, settings.kafka.group_id, settings.kafka.topic, [0])
            assert state[0].open and state[0].attempt == 0  # the attempt was withdrawn
        finally:
            pipeline.close()


def test_an_emitter_that_dies_stops_the_process_loudly(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings = make_settings(broker, emulator, tmp_path, unique)
    setup(broker, settings, partitions=1)
    clock = SystemClock()
    pipeline = build_pipeline(settings, clock, Metrics(), Health(clock))
    assert pipeline.emitter is not None

    def broken(stop: threading.Event) -> None:
        raise RuntimeError("Stripe answered something undocumented")

    pipeline.emitter.run = broken  # type: ignore[method-assign]
    with pytest.raises(EmitterFailed, match="undocumented"):
        pipeline.run(threading.Event())  # never stopped: only the failure ends it
