"""A topic deleted and re-created under the same name: the new incarnation's offsets start at
0 again, so state and committed offsets of the old one must not steer it (P4). Old event ids
re-sent into the new topic are still counted once (the ledger is keyed by the event)."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from consumer.config import Settings
from consumer.decode.schemas import reader_schema
from consumer.decode.wire import encode_confluent
from consumer.local.broker import TansuBroker
from consumer.local.demo import produce_messages, run_until_drained, stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.local.sample import Message, generate
from consumer.ops.totals import clickhouse_totals
from consumer.producer import event_record, message_key
from consumer.store import open_store
from tests.integration.conftest import make_settings

pytestmark = pytest.mark.integration


def test_state_of_a_deleted_topic_does_not_steer_its_recreated_namesake(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    """Also: event X sits at offset 0 of partition 0 in both incarnations, re-stamped a
    minute earlier in the new one (a producer's re-send). The new incarnation's first range
    there covers offset 0, where the ledger holds the old incarnation's X: that row is a
    copy, not the range's own write (P2), so X is a duplicate, counted once, as first
    written."""
    settings = make_settings(broker, emulator, tmp_path, unique)
    k = settings.kafka
    prefix = f"cus_{unique}_"
    broker.create_topics({k.topic: 2, k.dlq_topic: 1, k.late_topic: 1})
    now = int(time.time() * 1000)
    # half past an hour, before every event of the samples (which are then never late)
    at = (now - 5 * 3_600_000) // 3_600_000 * 3_600_000 + 30 * 60_000
    x_id = f"evt-{unique}-x"
    old = generate(3000, 8, 2, now, seed=21, customer_prefix=prefix)
    x = _event(x_id, f"{prefix}x", at, now)
    run_until_drained(
        settings, produce_messages([x, *old.messages], broker.bootstrap, k.topic), 90, quiet=True
    )
    old_id = _topic_ids(settings)

    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.delete_topics([k.topic])[k.topic].result(timeout=20)
    time.sleep(1)
    broker.create_topics({k.topic: 2})
    # The new incarnation is shorter than the old one (its offsets sit below the old state)
    # and carries 200 messages re-sent from the old topic: those must not count again.
    new = generate(1000, 8, 2, now, seed=22, customer_prefix=prefix)
    resent = [m for m in old.messages if m.kind == "accepted"][:200]
    again = _event(x_id, f"{prefix}x", at - 60_000, now)
    ends = produce_messages([again, *new.messages, *resent], broker.bootstrap, k.topic)
    assert sum(ends.values()) < sum(1 for _ in old.messages)
    run_until_drained(settings, ends, 90, quiet=True)

    expected = {
        key: old.truth.get(key, Decimal(0)) + new.truth.get(key, Decimal(0))
        for key in set(old.truth) | set(new.truth)
        if key[1] != "storage_gb"  # a `last` meter: totals of two samples don't add
    }
    expected[(f"{prefix}x", "api_calls")] = Decimal(7)
    store = open_store(settings.clickhouse)
    try:
        copies = store.query(
            """SELECT topic_id, toUnixTimestamp64Milli(event_time) FROM usage_events FINAL
               WHERE event_id = {e:String}""",
            {"e": x_id},
        )
        got = clickhouse_totals(store, settings.meters)
        recreated = store.query(
            "SELECT count(DISTINCT topic_id) FROM ingest_state WHERE topic = {t:String}",
            {"t": k.topic},
        )
    finally:
        store.close()
    billed = stripe_totals(settings, emulator.url)
    assert {key: v for key, v in got.items() if key in expected} == expected
    assert {key: v for key, v in billed.items() if key in expected} == expected
    assert int(recreated[0][0]) == 2  # both incarnations recorded, told apart
    assert [(str(i), int(t)) for i, t in copies] == [(old_id, at)]  # X once, as first written


def _event(event_id: str, customer: str, at_ms: int, now_ms: int) -> Message:
    record = event_record(event_id, "api_call", customer, Decimal(7), at_ms)
    value = encode_confluent(record, reader_schema(), 4)
    return Message(message_key("api_call", event_id), value, 0, "accepted", event_id, now_ms)


def _topic_ids(settings: Settings) -> str:
    """The incarnation the ledger rows of the topic carry (one, so far)."""
    store = open_store(settings.clickhouse)
    try:
        rows = store.query("SELECT DISTINCT topic_id FROM usage_events")
    finally:
        store.close()
    assert len(rows) == 1, rows
    return str(rows[0][0])
