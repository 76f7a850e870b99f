"""`usage-consumer run` as its own OS process: probes, metrics, SIGTERM drain and restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from consumer.intent.state import DONE, load_states
from consumer.local.broker import TansuBroker, free_port
from consumer.local.demo import stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.ops.totals import clickhouse_totals
from consumer.store import open_store
from tests.integration.conftest import STRIPE_KEY, produce_sample, wait_for

pytestmark = pytest.mark.integration


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def metric(body: str, name: str) -> float:
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def stop_cleanly(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, wait, and require a clean exit; returns what the process logged."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    return err


def test_sigterm_drains_commits_and_a_restart_finishes_exactly(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    produced = produce_sample(broker, emulator, tmp_path, unique, 40_000, 10, seed=21)
    settings, sample, ends = produced.settings, produced.sample, produced.ends
    prefix, k = produced.prefix, produced.settings.kafka
    port = free_port()
    env = {
        **os.environ,
        "USAGE_CONSUMER_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
        "USAGE_CONSUMER_KAFKA__TOPIC": k.topic,
        "USAGE_CONSUMER_KAFKA__DLQ_TOPIC": k.dlq_topic,
        "USAGE_CONSUMER_KAFKA__LATE_TOPIC": k.late_topic,
        "USAGE_CONSUMER_KAFKA__GROUP_ID": k.group_id,
        "USAGE_CONSUMER_KAFKA__CONSUMER_LIBRDKAFKA": json.dumps(
            {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}
        ),
        "USAGE_CONSUMER_CLICKHOUSE__CHDB_PATH": str(settings.clickhouse.chdb_path),
        "USAGE_CONSUMER_STRIPE__API_KEY": STRIPE_KEY,
        "USAGE_CONSUMER_STRIPE__API_BASE": emulator.url,
        "USAGE_CONSUMER_STRIPE__METER_EVENTS_BASE": emulator.url,
        "USAGE_CONSUMER_STRIPE__REQUESTS_PER_SECOND": "1000",
        "USAGE_CONSUMER_PIPELINE__BATCH_MAX_MESSAGES": "2000",
        "USAGE_CONSUMER_PIPELINE__METRICS_HOST": "127.0.0.1",
        "USAGE_CONSUMER_PIPELINE__METRICS_PORT": str(port),
    }
    cmd = [sys.executable, "-m", "consumer.cli", "run"]
    base = f"http://127.0.0.1:{port}"

    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(
            lambda: (
                metric(http_get(f"{base}/metrics")[1], "usage_consumer_ranges_committed_total") >= 2
            ),
            "progress",
            60,
        )
        assert http_get(f"{base}/healthz")[0] == 200
        assert http_get(f"{base}/readyz")[0] == 200
        err = stop_cleanly(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped cleanly" in err
    assert "hunter" not in err and STRIPE_KEY not in err  # no secret in the logs

    store = open_store(settings.clickhouse)
    try:
        states = load_states(store, k.group_id, k.topic, [0, 1, 2])
        assert states and all(s.rank == DONE for s in states.values())  # no open range left
        assert clickhouse_totals(store, settings.meters) != sample.truth  # stopped mid-stream
    finally:
        store.close()

    # The restart logs JSON, one object a line: every line of it, librdkafka's included.
    env["USAGE_CONSUMER_LOG__FORMAT"] = "json"
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        probe = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": k.group_id})

        def drained() -> bool:
            got = probe.committed([TopicPartition(k.topic, p) for p in ends], timeout=5)
            return all(tp.offset == ends[tp.partition] for tp in got)

        wait_for(drained, "every offset committed", 120)
        probe.close()
        wait_for(
            lambda: (
                {
                    key: v
                    for key, v in stripe_totals(settings, emulator.url).items()
                    if key[0].startswith(prefix)
                }
                == sample.truth
            ),
            "Stripe totals",
            120,
        )
        err = stop_cleanly(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(lines[-1])
    assert lines[-1]["message"] == "stopped cleanly"
    assert STRIPE_KEY not in err
    store = open_store(settings.clickhouse)
    try:
        assert clickhouse_totals(store, settings.meters) == sample.truth
    finally:
        store.close()
