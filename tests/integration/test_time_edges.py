"""Time at the edges: a duplicate 30 hours after its original, and producer clocks skewed
both ways. Decisions use record timestamps, never the consumer's clock (P1)."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

import pytest

from consumer.decode.schemas import reader_schema
from consumer.decode.wire import encode_confluent
from consumer.local.broker import TansuBroker
from consumer.local.demo import run_until_drained
from consumer.local.emulator import EmulatorServer
from consumer.metrics import Metrics
from consumer.producer import CURRENT_SCHEMA_ID, UsageProducer, event_record, message_key
from consumer.store import open_store
from tests.integration.conftest import make_settings

pytestmark = pytest.mark.integration
HOUR = 3_600_000


def test_a_duplicate_30_hours_later_and_skewed_producer_clocks(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings = make_settings(broker, emulator, tmp_path, unique, stripe={"enabled": False})
    k = settings.kafka
    broker.create_topics({k.topic: 1, k.dlq_topic: 1, k.late_topic: 1})
    p = UsageProducer({"bootstrap.servers": broker.bootstrap}, k.topic)
    schema = reader_schema()
    now = int(time.time() * 1000)
    customer = f"cus_{unique}"

    def send(event_id: str, event_ms: int, record_ms: int, value: int = 1) -> None:
        rec = event_record(event_id, "api_call", customer, Decimal(value), event_ms)
        p.send_raw(
            message_key("api_call", event_id),
            encode_confluent(rec, schema, CURRENT_SCHEMA_ID),
            record_time_ms=record_ms,
        )

    t0 = now - 31 * HOUR
    send("original", t0, t0, value=5)
    for h in range(1, 31):  # a day and more of normal traffic moves the watermark on
        send(f"hour-{h}", t0 + h * HOUR, t0 + h * HOUR)
    send("original", t0, now, value=5)  # the producer retried 30 hours later
    # A producer whose clock runs 4 minutes fast is within Stripe's 5: accepted.
    send("fast-clock", now + 4 * 60_000, now)
    # A producer 10 minutes fast is refused (dead letter), not silently billed.
    send("too-fast", now + 10 * 60_000, now)
    # A producer whose clock runs 20 minutes slow is within the hour of lateness: accepted.
    send("slow-clock", now - 20 * 60_000, now)
    assert p.flush() == 0

    metrics = Metrics()
    run_until_drained(settings, {0: 35}, timeout=60, metrics=metrics, quiet=True)
    store = open_store(settings.clickhouse)
    try:
        ids = {str(r[0]) for r in store.query("SELECT event_id FROM usage_events FINAL")}
        total = store.query(
            "SELECT toString(sum_value) FROM usage_totals WHERE meter = 'api_calls'"
        )
        dead = store.query("SELECT reason FROM dead_letters FINAL")
        late = store.query("SELECT count() FROM late_events FINAL")
    finally:
        store.close()
    assert ids == {"original", "fast-clock", "slow-clock", *(f"hour-{h}" for h in range(1, 31))}
    assert Decimal(total[0][0]) == 5 + 30 + 1 + 1  # the 30-hour duplicate counted once
    assert [str(r[0]) for r in dead] == ["timestamp_in_future"]
    assert int(late[0][0]) == 0  # a late copy of a known event is a duplicate, not late usage
    assert metrics.events_duplicate.labels("api_calls")._value.get() == 1
