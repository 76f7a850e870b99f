"""A dead letter its topic refuses for good (too large) must not wedge the partition: it is
kept in the dead_letters table, alerted on, and the range completes (P5)."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from consumer.local.broker import TansuBroker
from consumer.local.demo import run_until_drained
from consumer.local.emulator import EmulatorServer
from consumer.metrics import Metrics
from consumer.producer import UsageProducer
from consumer.store import open_store
from tests.integration.conftest import make_settings

pytestmark = pytest.mark.integration
LIMIT = 20_000  # the side-output producer's message.max.bytes


def test_a_dead_letter_too_large_for_its_topic_falls_back_to_the_table(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings = make_settings(
        broker,
        emulator,
        tmp_path,
        unique,
        stripe={"enabled": False},
        kafka={"producer_librdkafka": {"message.max.bytes": str(LIMIT)}},
    )
    k = settings.kafka
    broker.create_topics({k.topic: 1, k.dlq_topic: 1, k.late_topic: 1})
    p = UsageProducer({"bootstrap.servers": broker.bootstrap}, k.topic)
    now = int(time.time() * 1000)
    for i in range(20):
        p.send(
            event_id=f"ok-{i}",
            event_name="api_call",
            customer_id=f"cus_{unique}",
            value=Decimal(1),
            timestamp_ms=now + i,
        )
        if i == 10:
            p.send_raw(b"big", b"\x01" + b"x" * (3 * LIMIT))  # bad magic, and huge
            p.send_raw(b"small", b"\x01small")  # bad magic, fits
    assert p.flush() == 0

    metrics = Metrics()
    run_until_drained(settings, {0: 22}, timeout=60, metrics=metrics, quiet=True)

    store = open_store(settings.clickhouse)
    try:
        dead = store.query(
            "SELECT key, length(payload), reason FROM dead_letters FINAL ORDER BY key"
        )
        total = store.query("SELECT toString(sum_value) FROM usage_totals")
    finally:
        store.close()
    assert [(bytes(str(k_), "latin-1"), int(n), str(r)) for k_, n, r in dead] == [
        (b"big", 3 * LIMIT + 1, "bad_magic"),
        (b"small", 6, "bad_magic"),
    ]
    assert Decimal(total[0][0]) == 20
    refused = metrics.side_output_refused.labels("dead_letter", "message_too_large")
    assert refused._value.get() == 1
    assert dlq_keys(broker.bootstrap, k.dlq_topic) == [b"small"]  # the big one never got there


def dlq_keys(bootstrap: str, topic: str) -> list[bytes]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-reader"})
    try:
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        keys: list[bytes] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is not None and msg.error() is None:
                keys.append(bytes(msg.key() or b""))
            elif keys:
                break
        return keys
    finally:
        c.close()
