"""A topic deleted and re-created under the same name: the new incarnation's offsets start at
0 again, so state and committed offsets of the old one must not steer it (P4). Old event ids
re-sent into the new topic are still counted once (the ledger is keyed by the event)."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from consumer.local.broker import TansuBroker
from consumer.local.demo import produce_messages, run_until_drained, stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.local.sample import generate
from consumer.ops.totals import clickhouse_totals
from consumer.store import open_store
from tests.integration.conftest import make_settings

pytestmark = pytest.mark.integration


def test_state_of_a_deleted_topic_does_not_steer_its_recreated_namesake(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings = make_settings(broker, emulator, tmp_path, unique)
    k = settings.kafka
    prefix = f"cus_{unique}_"
    broker.create_topics({k.topic: 2, k.dlq_topic: 1, k.late_topic: 1})
    now = int(time.time() * 1000)
    old = generate(3000, 8, 2, now, seed=21, customer_prefix=prefix)
    run_until_drained(
        settings, produce_messages(old.messages, broker.bootstrap, k.topic), 90, quiet=True
    )

    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.delete_topics([k.topic])[k.topic].result(timeout=20)
    time.sleep(1)
    broker.create_topics({k.topic: 2})
    # The new incarnation is shorter than the old one (its offsets sit below the old state)
    # and carries 200 messages re-sent from the old topic: those must not count again.
    new = generate(1000, 8, 2, now, seed=22, customer_prefix=prefix)
    resent = [m for m in old.messages if m.kind == "accepted"][:200]
    ends = produce_messages(new.messages + resent, broker.bootstrap, k.topic)
    assert sum(ends.values()) < sum(1 for _ in old.messages)
    run_until_drained(settings, ends, 90, quiet=True)

    expected = {
        key: old.truth.get(key, Decimal(0)) + new.truth.get(key, Decimal(0))
        for key in set(old.truth) | set(new.truth)
        if key[1] != "storage_gb"  # a `last` meter: totals of two samples don't add
    }
    store = open_store(settings.clickhouse)
    try:
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
