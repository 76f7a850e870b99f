"""Two `usage-consumer run` processes on one group, against a real ClickHouse server and a
real Kafka (testcontainers: clickhouse/clickhouse-server, apache/kafka), the way several
consumers are deployed. A second process joins mid-run (a rebalance), then the first is
frozen with SIGSTOP for longer than the session timeout and max.poll.interval.ms, while it
is busy with a stream of ranges: the second takes every partition over and moves on. The
first is thawed and carries on as a zombie with whatever it was doing, gets fenced, and
leaves; the second finishes.

Ground truth, the ClickHouse ledger, windows and hourly view, and the Stripe emulator must
agree exactly; the group's committed offsets never go backwards at any point; each
partition's latest ingest_state is a completed range ending at the produced end; and both
processes exit cleanly on SIGTERM. Skipped, with the reason, where no Docker engine runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition

from consumer.config import Settings, load_settings
from consumer.intent.state import DONE, load_states
from consumer.local.broker import free_port
from consumer.local.demo import produce_messages, stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.local.sample import Message, generate
from consumer.ops.totals import clickhouse_totals
from consumer.store.backend import Backend
from consumer.store.server import ServerBackend
from tests.integration.conftest import (
    METERS,
    STRIPE_KEY,
    KafkaBroker,
    clickhouse_hourly,
    docker_missing,
    ledger_totals,
    stripe_hourly,
    wait_for,
)
from tests.integration.test_pipeline import ours
from tests.integration.test_run_command import http_get, metric

pytestmark = [
    pytest.mark.integration,
    pytest.mark.docker,
    pytest.mark.skipif(docker_missing() is not None, reason=docker_missing() or ""),
]
PARTITIONS = 4
FREEZE_SECONDS = 15  # > session.timeout.ms and max.poll.interval.ms (6 s each)


def process_config(
    bootstrap: str, ch: dict[str, Any], emulator: EmulatorServer, name: str, emit: bool
) -> dict[str, Any]:
    """One process's YAML configuration: the shared topic, group and ClickHouse database;
    only the process with `emit` runs the Stripe emitter (one emitter per store)."""
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topic": f"{name}.events",
            "dlq_topic": f"{name}.dlq",
            "late_topic": f"{name}.late",
            "group_id": name,
            "consumer_librdkafka": {
                "session.timeout.ms": "6000",
                "heartbeat.interval.ms": "1000",
                "max.poll.interval.ms": "6000",
            },
        },
        "clickhouse": ch,
        "stripe": {
            "enabled": emit,
            "api_key": STRIPE_KEY,
            "api_base": emulator.url,
            "meter_events_base": emulator.url,
            "requests_per_second": 1000,
            "concurrency": 4,
            "poll_interval_seconds": 0.2,
        },
        "pipeline": {
            "batch_max_messages": 1000,
            "batch_max_seconds": 0.2,
            "metrics_host": "127.0.0.1",
            "metrics_port": free_port(),
        },
        "meters": METERS,
    }


class Proc:
    """`usage-consumer run` in its own process, logging to a file."""

    def __init__(self, config: dict[str, Any], home: Path, name: str) -> None:
        self.path = home / f"{name}.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.log_path = home / f"{name}.log"
        self.metrics = f"http://127.0.0.1:{config['pipeline']['metrics_port']}/metrics"
        self._log: IO[str] = self.log_path.open("w")
        cmd = [sys.executable, "-m", "consumer.cli", "--config", str(self.path), "run"]
        self.popen = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, text=True)

    def counter(self, name: str) -> float:
        return metric(http_get(self.metrics)[1], name)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (or SIGKILL if it never stops); returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()
        return int(self.popen.returncode)

    def tail(self) -> str:
        return self.log_path.read_text()[-3000:]


class CommitWatch:
    """Samples the group's committed offsets from outside the group every half second;
    `went_back` lists every time a partition's committed offset decreased."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self._probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        self._tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        self.latest: dict[int, int] = {}
        self.went_back: list[tuple[int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commit-watch")
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.wait(0.5):
                try:
                    got = self._probe.committed(self._tps, timeout=5)
                except Exception:
                    continue
                for tp in got:
                    p, o = int(tp.partition or 0), int(tp.offset or 0)
                    if o < 0:
                        continue  # nothing committed yet
                    if o < self.latest.get(p, -1):
                        self.went_back.append((p, self.latest[p], o))
                    self.latest[p] = o
        finally:
            self._probe.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)


def test_two_processes_with_a_frozen_zombie_bill_exactly(
    kafka: str,
    clickhouse: dict[str, Any],
    emulator: EmulatorServer,
    tmp_path: Path,
    unique: str,
) -> None:
    name = f"p{unique}"
    zombie_cfg = process_config(kafka, clickhouse, emulator, name, emit=False)
    owner_cfg = process_config(kafka, clickhouse, emulator, name, emit=True)
    settings: Settings = load_settings(**owner_cfg)
    k = settings.kafka
    KafkaBroker(kafka).create_topics({k.topic: PARTITIONS, k.dlq_topic: 1, k.late_topic: 1})
    prefix = f"cus_{name}_"
    sample = generate(40_000, 10, PARTITIONS, int(time.time() * 1000), 29, customer_prefix=prefix)
    n = len(sample.messages)
    cuts = [0, n // 5, n * 2 // 5, n * 4 // 5, n]
    waves = [sample.messages[cuts[i] : cuts[i + 1]] for i in range(4)]
    ends: dict[int, int] = {}

    def produce(wave: list[Message]) -> None:
        for p, e in produce_messages(wave, kafka, k.topic).items():
            ends[p] = max(ends.get(p, 0), e)

    watch = CommitWatch(kafka, k.group_id, k.topic)
    zombie: Proc | None = None
    owner: Proc | None = None
    codes: dict[str, int] = {}
    try:
        produce(waves[0])
        zombie = Proc(zombie_cfg, tmp_path, "zombie")
        z = zombie
        wait_for(lambda: z.counter("usage_consumer_ranges_committed_total") >= 1, "A works", 120)
        owner = Proc(owner_cfg, tmp_path, "owner")
        o = owner
        produce(waves[1])
        wait_for(lambda: o.counter("usage_consumer_ranges_committed_total") >= 1, "B joins", 120)

        # A is busy with a long stream of ranges when it is frozen.
        before = z.counter("usage_consumer_ranges_committed_total")
        feeder = threading.Thread(target=produce, args=(waves[2],))
        feeder.start()
        wait_for(lambda: z.counter("usage_consumer_ranges_committed_total") > before, "A busy", 60)
        os.kill(z.popen.pid, signal.SIGSTOP)
        try:
            feeder.join(120)
            time.sleep(FREEZE_SECONDS)
            # B took every partition over and wrote everything produced so far.
            wait_for(
                lambda: all(watch.latest.get(p, -1) >= e for p, e in ends.items()),
                "B commits every partition while A is frozen",
                120,
            )
        finally:
            os.kill(z.popen.pid, signal.SIGCONT)

        # A carries on where it froze (a stale write, a refused commit), then is fenced.
        time.sleep(10)
        produce(waves[3])
        wait_for(
            lambda: all(watch.latest.get(p, -1) >= e for p, e in ends.items()),
            "every offset committed",
            180,
        )
        wait_for(
            lambda: ours(stripe_totals(settings, emulator.url), prefix) == sample.truth,
            "Stripe totals reach ground truth",
            180,
        )
        wait_for(lambda: o.counter("usage_consumer_stripe_outbox_idle") == 1, "outbox idle", 60)
    finally:
        for label, proc in (("zombie", zombie), ("owner", owner)):
            if proc is not None:
                codes[label] = proc.stop()
        watch.close()

    store: Backend = ServerBackend(
        clickhouse["host"],
        clickhouse["port"],
        clickhouse["username"],
        clickhouse["password"],
        clickhouse["database"],
    )
    try:
        meters = settings.meters
        assert ours(clickhouse_totals(store, meters), prefix) == sample.truth
        assert ledger_totals(store, meters, prefix) == sample.truth
        assert clickhouse_hourly(store, meters, prefix) == sample.truth_hourly
        states = load_states(store, k.group_id, k.topic, list(range(PARTITIONS)))
        assert {p: (s.rank, s.range_end) for p, s in states.items()} == {
            p: (DONE, e) for p, e in ends.items()
        }
    finally:
        store.close()
    assert ours(stripe_totals(settings, emulator.url), prefix) == sample.truth
    assert stripe_hourly(emulator.url, settings.meters, prefix) == sample.truth_hourly
    assert not watch.went_back, f"committed offsets went backwards: {watch.went_back}"
    assert watch.latest == ends
    assert owner is not None and zombie is not None
    assert codes["owner"] == 0, owner.tail()
    assert codes["zombie"] == 0, zombie.tail()
