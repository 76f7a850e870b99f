"""Copies of one event in two partitions of one batch are billed once, also when the batch
crashes after its writes and each range is re-formed alone: the earlier range's copy wins
in the batch, and every re-form finds exactly that copy in the ledger."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path

import pytest

from consumer.app import build_pipeline
from consumer.clock import SystemClock
from consumer.decode.schemas import SCHEMAS_DIR, load_schema
from consumer.decode.wire import encode_confluent
from consumer.intent.state import INTENT, load_states
from consumer.local.broker import TansuBroker
from consumer.local.demo import run_until_drained, stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.metrics import Metrics
from consumer.ops.health import Health
from consumer.producer import UsageProducer, event_record
from consumer.sinks.ledger import RangeWrite
from consumer.store import open_store
from tests.integration.conftest import make_settings
from tests.integration.test_pipeline import setup

pytestmark = pytest.mark.integration

V2 = load_schema(SCHEMAS_DIR / "usage_event.v2.avsc")


class Crash(Exception):
    """Stands in for a SIGKILL after the batch's ledger and outputs were written."""


def test_a_copy_in_another_partition_of_the_batch_is_billed_once_across_a_crash(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    # One poll waits for all six messages (both partitions), however late a loaded host
    # delivers the second partition's fetch: the test needs them in one batch.
    settings = make_settings(
        broker,
        emulator,
        tmp_path,
        unique,
        pipeline={"batch_max_messages": 6, "batch_max_seconds": 20},
    )
    k = settings.kafka
    setup(broker, settings, partitions=2)
    customer = f"cus_{unique}"
    now = int(time.time() * 1000) - 60_000
    # (partition, event id, value, timestamp): `same` is an exact copy; `moved` is copied
    # with another time and value, so its ledger identity differs; p0's copies win.
    sent = [
        (0, "same", 3, now),
        (0, "moved", 4, now),
        (0, "p0-only", 1, now),
        (1, "same", 3, now),
        (1, "moved", 9, now + 90_000),
        (1, "p1-only", 2, now),
    ]
    p = UsageProducer({"bootstrap.servers": broker.bootstrap}, k.topic)
    for partition, eid, value, ts in sent:
        rec = event_record(f"{unique}-{eid}", "tokens", customer, Decimal(value), ts, {})
        rec.pop("cancels", None)
        p.send_raw(None, encode_confluent(rec, V2, 2), partition=partition)
    assert p.flush() == 0

    store = open_store(settings.clickhouse)
    clock = SystemClock()
    try:
        first = build_pipeline(settings, clock, Metrics(), Health(clock), store)
        commits = first.ingestor.ctx.commits
        run = commits.run
        batches: list[set[int]] = []

        def crash_after_writes(
            ranges: Sequence[RangeWrite],
            now_ms: int,
            ledger_written: Callable[[], None] = lambda: None,
        ) -> None:
            batches.append({r.partition for r in ranges})
            if batches[-1] == {0, 1}:

                def crash(*_: object) -> None:
                    raise Crash

                commits.side.publish = crash  # type: ignore[method-assign,assignment]
            run(ranges, now_ms, ledger_written)

        commits.run = crash_after_writes  # type: ignore[method-assign]
        with pytest.raises(Crash):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                first.ingestor.step()
        first.close()
        assert batches == [{0, 1}], "both partitions were meant to be in the first batch"
        states = load_states(store, k.group_id, k.topic, [0, 1])
        assert [states[p].rank for p in (0, 1)] == [INTENT, INTENT]
        drain = make_settings(broker, emulator, tmp_path, unique)  # polls that return soon
        run_until_drained(drain, {0: 3, 1: 3}, timeout=120, quiet=True, store=store)
        rows = store.query(
            "SELECT event_id, partition, toString(value) FROM usage_events FINAL "
            f"WHERE customer_id = '{customer}' ORDER BY event_id"
        )
        windows = store.query(
            "SELECT toString(sum(sum_value)), sum(event_count) FROM usage_windows FINAL "
            f"WHERE customer_id = '{customer}'"
        )
    finally:
        store.close()
    assert [(r[0].removeprefix(f"{unique}-"), int(r[1]), Decimal(r[2])) for r in rows] == [
        ("moved", 0, Decimal(4)),
        ("p0-only", 0, Decimal(1)),
        ("p1-only", 1, Decimal(2)),
        ("same", 0, Decimal(3)),
    ]
    assert (Decimal(windows[0][0]), int(windows[0][1])) == (Decimal(10), 4)  # as the ledger
    billed = stripe_totals(settings, emulator.url)
    assert billed[(customer, "tokens")] == Decimal(10)
