"""A second consumer instance joins mid-run and leaves again (cooperative-sticky
rebalances both ways). With chDB both instances live in one process and share the store;
one emitter runs. Totals stay exact, and every partition ends committed."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from consumer.app import Pipeline, build_pipeline
from consumer.clock import SystemClock
from consumer.local.broker import TansuBroker
from consumer.local.demo import produce_messages, stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.local.sample import Message, generate
from consumer.metrics import Metrics
from consumer.ops.health import Health
from consumer.ops.totals import clickhouse_totals
from consumer.store import open_store
from tests.integration.conftest import explain_totals, make_settings, wait_for, wait_outbox_drained
from tests.integration.test_pipeline import ours

pytestmark = pytest.mark.integration


def test_an_instance_joins_and_leaves_mid_run(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings = make_settings(
        broker, emulator, tmp_path, unique, pipeline={"batch_max_messages": 500}
    )
    quiet = make_settings(
        broker,
        emulator,
        tmp_path,
        unique,
        stripe={"enabled": False},
        pipeline={"batch_max_messages": 500},
    )
    k = settings.kafka
    broker.create_topics({k.topic: 6, k.dlq_topic: 1, k.late_topic: 1})
    prefix = f"cus_{unique}_"
    sample = generate(24_000, 10, 6, int(time.time() * 1000), seed=31, customer_prefix=prefix)
    quarter = -(-len(sample.messages) // 4)  # contiguous in time, as data really arrives
    waves = [sample.messages[i : i + quarter] for i in range(0, len(sample.messages), quarter)]
    store = open_store(settings.clickhouse)
    clock = SystemClock()
    first = build_pipeline(settings, clock, Metrics(), Health(clock), store)
    second = build_pipeline(quiet, clock, Metrics(), Health(clock), store)
    stops = [threading.Event(), threading.Event()]

    def start(p: Pipeline, stop: threading.Event) -> threading.Thread:
        t = threading.Thread(target=p.run, args=(stop,))
        t.start()
        return t

    ends: dict[int, int] = {}

    def produce(wave: list[Message]) -> None:
        for p, e in produce_messages(wave, broker.bootstrap, k.topic).items():
            ends[p] = max(ends.get(p, 0), e)

    def committed() -> int:
        merged = {**second.ingestor.committed, **first.ingestor.committed}
        return sum(min(merged.get(p, 0), e) for p, e in ends.items())

    try:
        a = start(first, stops[0])
        produce(waves[0])
        wait_for(lambda: committed() > 0, "first instance makes progress")
        b = start(second, stops[1])
        produce(waves[1])
        wait_for(lambda: len(second.ingestor.tracks) > 0, "second instance gets partitions")
        produce(waves[2])
        wait_for(lambda: second.metrics.ranges_committed._value.get() > 0, "second writes")
        stops[1].set()
        b.join()
        produce(waves[3])
        wait_for(lambda: len(first.ingestor.tracks) == 6, "first takes every partition back")
        wait_for(
            lambda: all(first.ingestor.committed.get(p, 0) >= e for p, e in ends.items()),
            "every offset committed",
        )
        wait_outbox_drained(first, "outbox drained")
    finally:
        for s in stops:
            s.set()
        a.join()
    try:
        got = clickhouse_totals(store, settings.meters)
        assert got == sample.truth, explain_totals(store, got, sample.truth)
    finally:
        store.close()
    assert ours(stripe_totals(settings, emulator.url), prefix) == sample.truth
