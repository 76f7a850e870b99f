"""A message that crashes the C decoder's pass over the headers (P7): the pass runs only once
the range's intent is durable, so every crash is counted against the range, and the message
ends quarantined as a dead letter while the rest of the range is counted.

Real processes (tests/support/armed.py) on a real broker and store: each start SIGKILLs
itself when the header pass reaches the poison message, and is started again, as an
orchestrator would, until the partition is committed to its end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from consumer.config import load_settings
from consumer.decode.wire import frame_confluent
from consumer.local.broker import TansuBroker, free_port
from consumer.local.demo import produce_messages
from consumer.local.emulator import EmulatorServer
from consumer.local.sample import Message, generate
from consumer.store.chdb import ChdbBackend
from tests.integration.conftest import STRIPE_KEY, group_committed, ledger_totals

pytestmark = pytest.mark.integration

PILL = b"header-parse-pill"
LIMIT = 2  # pipeline.poison_after_attempts, its least
EVENTS = 12


def test_a_message_crashing_the_header_parse_is_quarantined_and_the_rest_counted(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    """The pill is alone in its first range (a range of many is searched the same way,
    chunk by chunk: test_poison.py, the chaos `poison` scenario); the events come after
    the first crash. LIMIT crashes on that one offset quarantine it."""
    topic = f"{unique}.events"
    broker.create_topics({topic: 1, f"{unique}.dlq": 1, f"{unique}.late": 1})
    prefix = f"cus_{unique}_"
    sample = generate(EVENTS, 3, 1, int(time.time() * 1000), seed=3, customer_prefix=prefix)
    good = [m for m in sample.messages if m.kind == "accepted"]
    pill = Message(None, frame_confluent(2, PILL), 0, "undecodable")
    produce_messages([pill], broker.bootstrap, topic)

    env = _env(broker, emulator, tmp_path, unique)
    log = tmp_path / "consumer.log"
    crashes = 0
    with log.open("ab") as out:
        for start in range(LIMIT + 2):  # bounded: a crash never counted would loop forever
            if _run_once(env, out, broker.bootstrap, unique, 1 + len(good)):
                break
            crashes += 1
            if start == 0:  # the pill's range is formed and crashed: the rest comes now
                produce_messages(good, broker.bootstrap, topic)
        else:
            tail = log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"never drained after {crashes} crashes; log tail:\n{tail}")
    assert crashes == LIMIT, log.read_text(errors="replace")[-3000:]

    store = ChdbBackend(tmp_path / "chdb", "usage")
    try:
        dead = store.query("SELECT offset, reason FROM dead_letters FINAL ORDER BY offset")
        ids = store.query("SELECT event_id FROM usage_events FINAL ORDER BY event_id")
        totals = ledger_totals(store, load_settings().meters, prefix)
        done = store.query(
            """SELECT snapshot FROM ingest_state WHERE group_id = {g:String}
               AND state_rank = 2 AND range_start = 1""",
            {"g": unique},
        )
    finally:
        store.close()
    assert [(int(o), str(r)) for o, r in dead] == [(0, "poison")]
    assert [str(i) for (i,) in ids] == sorted(m.event_id for m in good)
    assert totals == sample.truth
    # the header pass ran after the intent: its schema ids are on the done row
    assert any(json.loads(str(s))["schema_ids"] for (s,) in done)


def _run_once(env: dict[str, str], out: BinaryIO, bootstrap: str, group: str, end: int) -> bool:
    """One start: True once the partition is committed to its end (then stopped cleanly),
    False when the process SIGKILLed itself at the poison header."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.armed"], env=env, stdout=out, stderr=out
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}"
                return False
            if group_committed(bootstrap, group, f"{group}.events", [0]) == {0: end}:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=60) == 0
                return True
            time.sleep(0.3)
        raise AssertionError("a start neither crashed nor drained in 120 s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _env(broker: TansuBroker, emulator: EmulatorServer, tmp: Path, name: str) -> dict[str, str]:
    return {
        **os.environ,
        "USAGE_CONSUMER_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
        "USAGE_CONSUMER_KAFKA__TOPIC": f"{name}.events",
        "USAGE_CONSUMER_KAFKA__DLQ_TOPIC": f"{name}.dlq",
        "USAGE_CONSUMER_KAFKA__LATE_TOPIC": f"{name}.late",
        "USAGE_CONSUMER_KAFKA__GROUP_ID": name,
        "USAGE_CONSUMER_KAFKA__CONSUMER_LIBRDKAFKA": json.dumps(
            {"session.timeout.ms": "1000", "heartbeat.interval.ms": "250"}
        ),
        "USAGE_CONSUMER_CLICKHOUSE__CHDB_PATH": str(tmp / "chdb"),
        "USAGE_CONSUMER_STRIPE__API_KEY": STRIPE_KEY,
        "USAGE_CONSUMER_STRIPE__API_BASE": emulator.url,
        "USAGE_CONSUMER_STRIPE__METER_EVENTS_BASE": emulator.url,
        "USAGE_CONSUMER_PIPELINE__METRICS_PORT": str(free_port()),
        "USAGE_CONSUMER_PIPELINE__POISON_AFTER_ATTEMPTS": str(LIMIT),
        "USAGE_CONSUMER_POISON_HEADERS": PILL.decode(),
        "USAGE_CONSUMER_FAULT": "",
        "USAGE_CONSUMER_POISON": "",
        "USAGE_CONSUMER_STORE_FAULTS": "",
    }
