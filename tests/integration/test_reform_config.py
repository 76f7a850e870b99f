"""A range re-formed after the meters configuration changed is classified with the
configuration it was first formed with (P1); new ranges use the new one."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

import pytest

from consumer.app import build_pipeline
from consumer.clock import SystemClock
from consumer.intent.state import DONE, INTENT, load_states
from consumer.local.broker import TansuBroker
from consumer.local.emulator import EmulatorServer
from consumer.metrics import Metrics
from consumer.ops.health import Health
from consumer.producer import UsageProducer
from consumer.store import open_store
from tests.integration.conftest import METERS, make_settings, wait_for

pytestmark = pytest.mark.integration


class Crash(Exception):
    """Stands in for a SIGKILL right after the intent was written."""


def test_reform_uses_the_configuration_of_its_intent(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    old = make_settings(broker, emulator, tmp_path, unique, stripe={"enabled": False})
    new = make_settings(
        broker,
        emulator,
        tmp_path,
        unique,
        stripe={"enabled": False},
        meters=[m for m in METERS if m["name"] != "tokens"],
    )
    assert old.config_hash() != new.config_hash()
    k = old.kafka
    broker.create_topics({k.topic: 1, k.dlq_topic: 1, k.late_topic: 1})
    p = UsageProducer({"bootstrap.servers": broker.bootstrap}, k.topic)
    now = int(time.time() * 1000)
    for i in range(10):
        p.send(
            event_id=f"{unique}-{i}",
            event_name="tokens",
            customer_id="cus_1",
            value=Decimal(7),
            timestamp_ms=now + i,
        )
    assert p.flush() == 0

    store = open_store(old.clickhouse)
    clock = SystemClock()
    try:
        first = build_pipeline(old, clock, Metrics(), Health(clock), store)

        def crash(*_: object) -> None:
            raise Crash

        first.ingestor.ctx.commits.side.publish = crash  # type: ignore[method-assign,assignment]
        with pytest.raises(Crash):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                first.ingestor.step()
        first.close()
        state = load_states(store, k.group_id, k.topic, [0])[0]
        assert (state.rank, state.range_start, state.range_end) == (INTENT, 0, 10)

        second = build_pipeline(new, clock, Metrics(), Health(clock), store)
        try:
            wait_for(
                lambda: (
                    second.ingestor.step() >= 0
                    and load_states(store, k.group_id, k.topic, [0])[0].rank == DONE
                ),
                "the open range is re-formed",
            )
        finally:
            second.close()
        ledger = store.query("SELECT count() FROM usage_events FINAL WHERE meter = 'tokens'")
        dead = store.query("SELECT count() FROM dead_letters FINAL")
    finally:
        store.close()
    assert int(ledger[0][0]) == 10  # classified as the intent's configuration had it
    assert int(dead[0][0]) == 0
