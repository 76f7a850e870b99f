"""Two `usage-consumer run` processes on one store (the server backend, through the
ClickHouse HTTP endpoint over chDB): only the lease holder sends; when it is SIGKILLed
with a backlog in flight, the other takes the lease and finishes, and Stripe ends equal to
the ground truth, not one unit more. Prints how long billing paused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from consumer.config import Settings
from consumer.local.broker import TansuBroker, free_port
from consumer.local.demo import stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.ops.totals import Totals, clickhouse_totals
from consumer.store import open_store
from tests.integration.conftest import (
    CLICKHOUSE_PASSWORD,
    CLICKHOUSE_USER,
    STRIPE_KEY,
    produce_sample,
    server_config,
    wait_for,
)
from tests.integration.test_run_command import http_get, metric
from tests.support.clickhouse_http import Endpoint

pytestmark = pytest.mark.integration


def test_the_emitter_fails_over_to_the_other_process_exactly(
    broker: TansuBroker,
    emulator: EmulatorServer,
    clickhouse_http: Endpoint,
    tmp_path: Path,
    unique: str,
) -> None:
    ch = server_config(clickhouse_http.host, clickhouse_http.port, f"f{unique}")
    produced = produce_sample(broker, emulator, tmp_path, unique, 6_000, 6, seed=31, clickhouse=ch)
    settings, sample, prefix, k = (
        produced.settings,
        produced.sample,
        produced.prefix,
        produced.settings.kafka,
    )
    ports = [free_port(), free_port()]

    def env(port: int) -> dict[str, str]:
        return {
            **os.environ,
            "USAGE_CONSUMER_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
            "USAGE_CONSUMER_KAFKA__TOPIC": k.topic,
            "USAGE_CONSUMER_KAFKA__DLQ_TOPIC": k.dlq_topic,
            "USAGE_CONSUMER_KAFKA__LATE_TOPIC": k.late_topic,
            "USAGE_CONSUMER_KAFKA__GROUP_ID": k.group_id,
            "USAGE_CONSUMER_KAFKA__CONTROL_TOPIC": f"{unique}.control",
            "USAGE_CONSUMER_KAFKA__CONSUMER_LIBRDKAFKA": json.dumps(
                {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}
            ),
            "USAGE_CONSUMER_CLICKHOUSE__BACKEND": "server",
            "USAGE_CONSUMER_CLICKHOUSE__HOST": clickhouse_http.host,
            "USAGE_CONSUMER_CLICKHOUSE__PORT": str(clickhouse_http.port),
            "USAGE_CONSUMER_CLICKHOUSE__USERNAME": CLICKHOUSE_USER,
            "USAGE_CONSUMER_CLICKHOUSE__PASSWORD": CLICKHOUSE_PASSWORD,
            "USAGE_CONSUMER_CLICKHOUSE__DATABASE": f"f{unique}",
            "USAGE_CONSUMER_STRIPE__API_KEY": STRIPE_KEY,
            "USAGE_CONSUMER_STRIPE__API_BASE": emulator.url,
            "USAGE_CONSUMER_STRIPE__METER_EVENTS_BASE": emulator.url,
            # slow enough that the backlog is still being sent when the holder dies
            "USAGE_CONSUMER_STRIPE__REQUESTS_PER_SECOND": "4",
            "USAGE_CONSUMER_STRIPE__MAX_EVENTS_PER_REQUEST": "25",
            "USAGE_CONSUMER_PIPELINE__METRICS_HOST": "127.0.0.1",
            "USAGE_CONSUMER_PIPELINE__METRICS_PORT": str(port),
        }

    cmd = [sys.executable, "-m", "consumer.cli", "run"]
    store = open_store(settings.clickhouse)
    procs: list[subprocess.Popen[bytes]] = []

    def held(i: int) -> bool:
        return metric(http_get(f"http://127.0.0.1:{ports[i]}/metrics")[1],
                      "usage_consumer_emitter_lease_held") == 1  # fmt: skip

    try:
        procs.append(subprocess.Popen(cmd, env=env(ports[0]), stderr=subprocess.DEVNULL))
        wait_for(lambda: held(0), "the first process holds the lease", 120)
        wait_for(
            lambda: {key: v for key, v in clickhouse_totals(store, settings.meters).items()
                     if key[0].startswith(prefix)} == sample.truth,
            "the first process ingested everything", 180,
        )  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env(ports[1]), stderr=subprocess.DEVNULL))
        wait_for(lambda: http_get(f"http://127.0.0.1:{ports[1]}/readyz")[0] == 200, "second", 120)
        for _ in range(20):  # both run; one sends
            assert held(0) and not held(1)
            time.sleep(0.1)
        before = stripe_of(settings, emulator, prefix)
        assert before != sample.truth  # a backlog is in flight
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        killed, sent = time.monotonic(), stream_requests(emulator)
        wait_for(lambda: held(1), "the second process takes the lease", 120)
        taken = time.monotonic() - killed
        wait_for(lambda: stream_requests(emulator) > sent, "the second process sends", 60)
        resumed = time.monotonic() - killed
        wait_for(lambda: stripe_of(settings, emulator, prefix) == sample.truth, "Stripe", 300)
        print(f"emitter failover after SIGKILL (session.timeout.ms 6000): lease taken after "
              f"{taken:.1f} s, sending again after {resumed:.1f} s")  # fmt: skip
        time.sleep(3)  # nothing more arrives: exactly the truth, not a unit more
        assert stripe_of(settings, emulator, prefix) == sample.truth
        epochs = store.query("SELECT epoch FROM emitter_epochs ORDER BY epoch")
        assert len(epochs) == 2 and epochs[0][0] < epochs[1][0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        store.close()


def stripe_of(settings: Settings, emulator: EmulatorServer, prefix: str) -> Totals:
    totals = stripe_totals(settings, emulator.url)
    return {key: v for key, v in totals.items() if key[0].startswith(prefix)}


def stream_requests(emulator: EmulatorServer) -> int:
    with urllib.request.urlopen(f"{emulator.url}/_emulator/state", timeout=10) as resp:
        return int(json.loads(resp.read())["requests"]["stream"])
