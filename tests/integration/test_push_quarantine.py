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
from typing import Any

import pytest

from consumer.config import Settings
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

    def start(env: dict[str, str]) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "tests.support.armed"], env=env, cwd=ROOT,
                stdout=out, stderr=out,
            )  # fmt: skip

    def until(proc: subprocess.Popen[bytes], rejected: float) -> bool:
        """Run until the outbox is idle with `rejected` pushes held, then stop it."""
        settled = False
        deadline = time.monotonic() + 90  # a bound on one process's run
        while proc.poll() is None and time.monotonic() < deadline:
            idle = _metric(port, "usage_consumer_stripe_outbox_idle")
            held = _metric(port, 'usage_consumer_stripe_pushes_held{status="rejected"}')
            if idle == 1 and held == rejected:
                settled = True
                break
            time.sleep(0.2)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        return settled

    # A bound on restarts, not a timing: a crash-loop without quarantine never settles.
    for _start in range(CRASH_LIMIT + 4):
        proc = start(env)
        settled = until(proc, rejected=1)
        kills += proc.returncode == -signal.SIGKILL
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
    assert status == "quarantined" and reason.startswith("quarantined: 2 sends got no answer")
    assert others == [(1,)]  # only the quarantined push is not billed
    expected = dict(sample.truth)
    expected[(customer, "tokens")] -= Decimal(value)
    assert billed(run.settings, emulator, run.prefix) == {k: v for k, v in expected.items() if v}

    # A person sees it, releases it (its cause fixed: no poison armed), and it is billed.
    cli_env = {k: v for k, v in env.items() if k != "USAGE_CONSUMER_POISON_PUSH"}
    totals = cli("totals", env=cli_env)
    assert f"once the cause is fixed):\n{poison_id}\n" in totals.stdout, totals.stdout
    row = next(line for line in totals.stdout.splitlines() if "quarantined: " in line)
    assert customer in row and " quarantined " in row and value.rstrip("0").rstrip(".") in row
    released = cli("push", "release", poison_id, env=cli_env)
    assert released.returncode == 0 and "the emitter sends it again" in released.stdout, released
    again = cli("push", "release", poison_id, env=cli_env)
    assert again.returncode == 1 and "not a quarantined push" in again.stderr
    assert until(start(cli_env), rejected=0), log.read_text()[-3000:]
    assert billed(run.settings, emulator, run.prefix) == {
        k: v for k, v in sample.truth.items() if v
    }


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consumer.cli", *args], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def billed(settings: Settings, emulator: EmulatorServer, prefix: str) -> dict[Any, Decimal]:
    """What the emulator bills this test's customers."""
    totals = stripe_totals(settings, emulator.url)
    return {key: v for key, v in totals.items() if key[0].startswith(prefix)}
