"""`usage_consumer_consumer_lag_messages` equals the true end offset minus what is consumed,
on a broker whose ListOffsets answer is odd: Tansu answers the last batch's base offset + 1,
short of the end by the rest of that batch. The fetch responses' high watermark is exact,
so the gauge follows it, and takes the asked end only when larger (a paused partition's
fetches stop, and its gauge must still move)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer, TopicPartition

from consumer.app import build_pipeline
from consumer.clock import SystemClock
from consumer.local.broker import TansuBroker
from consumer.local.emulator import EmulatorServer
from consumer.local.sample import Message, generate
from consumer.metrics import Metrics
from consumer.ops.health import Health
from tests.integration.conftest import make_settings

pytestmark = pytest.mark.integration


def produce_batched(bootstrap: str, topic: str, messages: list[Message]) -> int:
    """Into partition 0, lingering so that records share batches; the true end offset."""
    ends: list[int] = []

    def delivered(err: object, record: Any) -> None:
        assert err is None, err
        ends.append(int(record.offset() or 0))

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 100})
    for m in messages:
        producer.produce(topic, m.value, m.key, partition=0, on_delivery=delivered)
    assert producer.flush(30) == 0
    return max(ends) + 1


def test_the_lag_gauge_is_the_true_end_minus_the_consumed(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings = make_settings(
        broker,
        emulator,
        tmp_path,
        unique,
        stripe={"enabled": False},
        pipeline={"batch_max_messages": 300},
    )
    k = settings.kafka
    broker.create_topics({k.topic: 1, k.dlq_topic: 1, k.late_topic: 1})
    sample = generate(1_500, 3, 1, int(time.time() * 1000), seed=9, customer_prefix=unique)
    messages = [m for m in sample.messages if m.partition is not None]
    end = produce_batched(broker.bootstrap, k.topic, messages[:1_000])
    clock, metrics = SystemClock(), Metrics()
    pipeline = build_pipeline(settings, clock, metrics, Health(clock))
    consumer, ingestor = pipeline.consumer, pipeline.ingestor
    tp = TopicPartition(k.topic, 0)

    def gauge() -> float | None:
        return metrics.registry.get_sample_value(
            "usage_consumer_consumer_lag_messages", {"partition": "0"}
        )

    try:
        asked = consumer.get_watermark_offsets(tp, timeout=5)[1]
        assert asked < end, "the broker's ListOffsets answer is exact here: nothing to show"
        seen = []
        deadline = time.monotonic() + 60
        while ingestor.committed.get(0) != end:
            assert time.monotonic() < deadline, "never consumed to the end"
            ingestor.step()
            done = ingestor.committed.get(0)
            if done is not None and gauge() is not None:
                assert gauge() == end - done  # exact at every write, not the asked end
                seen.append(end - done)
        assert seen[0] > 0 and seen[-1] == 0  # seen with lag and caught up

        # Paused (as during a ClickHouse outage): no fetch moves the cached watermark, so
        # the gauge moves with the asked end, short as it may be, never backwards.
        consumer.pause([tp])
        more = produce_batched(broker.bootstrap, k.topic, messages[1_000:])
        for _ in range(5):
            ingestor.step()
        assert gauge() == 0  # not asked yet: between two asks the gauge stands
        ingestor._lag_asked = float("-inf")  # the ask is due
        ingestor.step()
        moved = gauge()
        assert moved is not None and 0 < moved <= more - end
        print(
            f"paused: true lag {more - end}, gauge {moved} (asked end {more - end - moved} short)"
        )
    finally:
        pipeline.close()
