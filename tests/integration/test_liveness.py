"""/healthz catches a stuck consumer, not only a dead one: when the consume loop, the rollup
or the emitter hangs in a call that never returns while messages wait, the probe turns
unhealthy within `pipeline.stall_seconds` and names the part; once the call returns it is
healthy again. An outage the parts retry through is not stuck
(test_clickhouse_edges.py shows /healthz staying 200 while ClickHouse is down)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from consumer.local.broker import TansuBroker
from consumer.local.demo import produce_messages
from consumer.local.emulator import EmulatorServer
from consumer.local.sample import generate
from consumer.store import open_store
from consumer.store.backend import Backend
from consumer.store.migrations import migrate
from tests.integration.clickhouse_probes import Running
from tests.integration.conftest import make_settings, wait_for
from tests.integration.store_wrap import Passthrough

pytestmark = pytest.mark.integration
STALL = 5.0


class HangingStore(Passthrough):
    """The real store; once `target` is set, the first call whose statement names it blocks
    until `release` is set, as a ClickHouse call that never returns."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.target = ""
        self.hung = threading.Event()
        self.release = threading.Event()

    def check(self, text: str) -> None:
        if self.target and self.target in text and not self.hung.is_set():
            self.hung.set()
            self.release.wait(120)


@pytest.mark.parametrize(
    ("part", "statement"),
    [
        ("consume", "INSERT INTO usage_events"),  # the ledger write, on the consume loop
        ("rollup", "INSERT INTO usage_windows"),  # the window recompute, on its thread
        ("emitter", "FROM planning_queue FINAL WHERE planned = 0"),  # a cycle's first read
    ],
)
def test_a_stuck_part_fails_liveness_within_the_stall_time(
    broker: TansuBroker,
    emulator: EmulatorServer,
    tmp_path: Path,
    unique: str,
    part: str,
    statement: str,
) -> None:
    settings = make_settings(broker, emulator, tmp_path, unique, pipeline={"stall_seconds": STALL})
    k = settings.kafka
    broker.create_topics({k.topic: 2, k.dlq_topic: 1, k.late_topic: 1})
    sample = generate(1_000, 4, 2, int(time.time() * 1000), seed=5, customer_prefix=unique)
    half = len(sample.messages) // 2
    inner = open_store(settings.clickhouse)
    migrate(inner)
    store = HangingStore(inner)
    running = Running(settings, store).start()
    try:
        running.wait_drained(produce_messages(sample.messages[:half], broker.bootstrap, k.topic))
        assert running.get("/healthz") == (200, "ok\n")
        store.target = statement
        produce_messages(sample.messages[half:], broker.bootstrap, k.topic)  # work waits
        wait_for(store.hung.is_set, f"the {part} call hangs", 30)
        hung_at = time.monotonic()
        wait_for(lambda: running.get("/healthz")[0] == 503, "/healthz fails", 6 * STALL)
        after = time.monotonic() - hung_at
        # naming the part that hangs and only that one (a loop waiting on it is not stuck)
        assert running.get("/healthz") == (503, f"stalled: {part}\n")
        assert running.get("/readyz")[0] == 200  # its dependencies are fine: still ready
        store.release.set()
        wait_for(lambda: running.get("/healthz")[0] == 200, "/healthz recovers", 30)
        print(f"{part}: /healthz failed {after:.1f} s after the call hung (stall {STALL} s)")
    finally:
        store.release.set()
        running.stop()
        store.close()
