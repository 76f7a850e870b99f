"""A Stripe outage never blocks ingestion: ClickHouse stays fresh and Kafka commits go on
while the outbox grows; when Stripe is back the emitter catches up exactly."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import pytest

from consumer.app import build_pipeline
from consumer.clock import SystemClock
from consumer.local.broker import TansuBroker
from consumer.local.demo import stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.metrics import Metrics
from consumer.ops.health import Health
from consumer.ops.totals import clickhouse_totals
from consumer.store import open_store
from tests.integration.conftest import produce_sample, wait_for, wait_outbox_drained
from tests.integration.test_pipeline import ours

pytestmark = pytest.mark.integration


def configure(emulator: EmulatorServer, **options: float) -> None:
    req = urllib.request.Request(
        f"{emulator.url}/_emulator/config",
        method="POST",
        data=json.dumps(options).encode(),
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=5).close()


def test_stripe_down_does_not_stop_ingestion_and_the_emitter_catches_up(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    run = produce_sample(
        broker, emulator, tmp_path, unique, 6_000, 5, seed=41, stripe={"max_retries": 1}
    )
    settings, sample, ends = run.settings, run.sample, run.ends
    configure(emulator, rate_5xx=1.0)
    store = open_store(settings.clickhouse)
    clock = SystemClock()
    metrics = Metrics()
    pipeline = build_pipeline(settings, clock, metrics, Health(clock), store)
    stop = threading.Event()
    worker = threading.Thread(target=pipeline.run, args=(stop,))
    worker.start()
    try:
        # visible: committed and its windows recomputed (the rollup trails the commit)
        wait_for(
            lambda: all(pipeline.rollup.visible.get(p, 0) >= e for p, e in ends.items()),
            "every offset committed and visible while Stripe answers 500",
        )
        assert clickhouse_totals(store, settings.meters) == sample.truth
        assert ours(stripe_totals(settings, run.settings.stripe.api_base), run.prefix) == {}
        assert metrics.stripe_pending._value.get() > 0  # the outbox holds the usage
        configure(emulator, rate_5xx=0.0)
        wait_outbox_drained(pipeline, "the emitter catches up")
    finally:
        configure(emulator, rate_5xx=0.0)
        stop.set()
        worker.join()
        store.close()
    assert ours(stripe_totals(settings, emulator.url), run.prefix) == sample.truth
