"""A push that crashes the emitter every time it is sent (consumer/emitter/send/
unanswered.py): real `usage-consumer run` processes (tests/support/armed.py kills one
whenever that push is about to be sent), restarted until the push is quarantined; every
other push of its customer and of the others reaches the Stripe emulator exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest

from consumer.emitter.plan.identifiers import per_event_identifier
from consumer.local.broker import TansuBroker, free_port
from consumer.local.demo import stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.ops.totals import clickhouse_totals
from consumer.store import open_store
from tests.integration.conftest import STRIPE_KEY, produce_sample

pytestmark = pytest.mark.integration
CRASH_LIMIT = 2  # pipeline.poison_after_attempts: its least, to keep the restarts few
ROOT = Path(__file__).resolve().parents[2]


def _metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_push_that_crashes_the_emitter_is_quarantined_and_the_rest_billed(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    run = produce_sample(broker, emulator, tmp_path, f"q{unique}", 150, 3, seed=23)
    k, sample = run.settings.kafka, run.sample
    poison = next(m for m in sample.messages if m.kind == "accepted" and m.key is not None
                  and m.key.startswith(b"tokens/"))  # fmt: skip
    poison_id = per_event_identifier("tokens", poison.event_id)
    port = free_port()
    env = {
        **os.environ,
        "USAGE_CONSUMER_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
        "USAGE_CONSUMER_KAFKA__TOPIC": k.topic,
        "USAGE_CONSUMER_KAFKA__DLQ_TOPIC": k.dlq_topic,
        "USAGE_CONSUMER_KAFKA__LATE_TOPIC": k.late_topic,
        "USAGE_CONSUMER_KAFKA__GROUP_ID": k.group_id,
        # a killed member's partitions move on after its session: keep it short
        "USAGE_CONSUMER_KAFKA__CONSUMER_LIBRDKAFKA": '{"session.timeout.ms": "3000", '
        '"heartbeat.interval.ms": "500"}',
        "USAGE_CONSUMER_CLICKHOUSE__CHDB_PATH": str(run.settings.clickhouse.chdb_path),
        "USAGE_CONSUMER_STRIPE__API_KEY": STRIPE_KEY,
        "USAGE_CONSUMER_STRIPE__API_BASE": emulator.url,
        "USAGE_CONSUMER_STRIPE__METER_EVENTS_BASE": emulator.url,
        "USAGE_CONSUMER_STRIPE__POLL_INTERVAL_SECONDS": "0.1",
        "USAGE_CONSUMER_STRIPE__REQUESTS_PER_SECOND": "1000",
        "USAGE_CONSUMER_PIPELINE__POISON_AFTER_ATTEMPTS": str(CRASH_LIMIT),
        "USAGE_CONSUMER_PIPELINE__METRICS_PORT": str(port),
        "USAGE_CONSUMER_POISON_PUSH": poison_id,
    }
    kills = 0
    log = tmp_path / "runs.log"
    # A bound on restarts, not a timing: a crash-loop without quarantine never settles.
    for _start in range(CRASH_LIMIT + 4):
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.armed"], env=env, cwd=ROOT,
                stdout=out, stderr=out,
            )  # fmt: skip
        settled = False
        deadline = time.monotonic() + 90  # a bound on one process's run
        while proc.poll() is None and time.monotonic() < deadline:
            idle = _metric(port, "usage_consumer_stripe_outbox_idle")
            aside = _metric(port, 'usage_consumer_stripe_pushes_held{status="rejected"}')
            if idle == 1 and aside:
                settled = True
                break
            time.sleep(0.2)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        if settled:
            break
    tail = log.read_text()[-3000:]
    assert settled, f"never quarantined after {kills} kills:\n{tail}"
    # the first kill came in a batch; then the push crashed CRASH_LIMIT times alone
    assert kills == CRASH_LIMIT + 1, tail
    assert "quarantined, held for a person" in log.read_text()

    store = open_store(run.settings.clickhouse)
    try:
        held = store.query(
            "SELECT customer_id, toString(value), status, reason FROM stripe_delivery "
            "WHERE identifier = {i:String}",
            {"i": poison_id},
        )
        assert clickhouse_totals(store, run.settings.meters) == sample.truth  # nothing lost
        others = store.query(
            "SELECT count() FROM stripe_delivery WHERE status NOT IN ('sent', 'cancelled')"
        )
    finally:
        store.close()
    ((customer, value, status, reason),) = held
    assert status == "rejected" and reason.startswith("quarantined: the emitter crashed 2 times")
    assert others == [(1,)]  # only the quarantined push is not billed
    expected = dict(sample.truth)
    expected[(customer, "tokens")] -= Decimal(value)
    billed = stripe_totals(run.settings, emulator.url)
    assert {key: v for key, v in billed.items() if key[0].startswith(run.prefix)} == {
        key: v for key, v in expected.items() if v
    }
