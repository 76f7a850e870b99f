"""`usage-consumer dlq` on the real local services (Tansu, chDB, the Stripe emulator): list
and show dead letters, re-drive them once a meter is configured (counted once, however often
re-driven), and the dead-letter flood stop with its release."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import stripe
import yaml
from confluent_kafka import KafkaError, Message

from consumer import cli
from consumer.config import Settings, load_settings
from consumer.local.broker import TansuBroker
from consumer.local.demo import run_until_drained, stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.ops.totals import clickhouse_totals
from consumer.producer import UsageProducer
from consumer.store import open_store
from tests.integration.conftest import METERS, STRIPE_KEY
from tests.support import redrives

pytestmark = pytest.mark.integration

GPU = {
    "name": "gpu_seconds",
    "event_name": "gpu_seconds",
    "aggregation": "sum",
    "stripe_event_name": "gpu_seconds",
    "emission": "aggregated",
}


def config(
    broker: TansuBroker, emulator: EmulatorServer, tmp: Path, name: str, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": broker.bootstrap,
            "topic": f"{name}.events",
            "dlq_topic": f"{name}.dlq",
            "late_topic": f"{name}.late",
            "group_id": name,
            "consumer_librdkafka": {"session.timeout.ms": "3000", "heartbeat.interval.ms": "500"},
        },
        "clickhouse": {"chdb_path": str(tmp / "chdb")},
        "stripe": {
            "api_key": STRIPE_KEY,
            "api_base": emulator.url,
            "meter_events_base": emulator.url,
            "requests_per_second": 1000,
            "poll_interval_seconds": 0.1,
        },
        "pipeline": {"batch_max_messages": 2000, "batch_max_seconds": 0.2, "metrics_port": 0},
        "meters": METERS,
    }
    for key, value in extra.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) else value
    return body


def write(body: dict[str, Any], path: Path) -> tuple[Path, Settings]:
    path.write_text(yaml.safe_dump(body))
    return path, load_settings(path)


class Ends:
    """The end offset of each partition, from the delivery reports."""

    def __init__(self) -> None:
        self.ends: dict[int, int] = {}

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        assert err is None, err
        p = int(msg.partition() or 0)
        self.ends[p] = max(self.ends.get(p, 0), int(msg.offset() or 0) + 1)


def dlq(capsys: pytest.CaptureFixture[str], conf: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["--config", str(conf), "dlq", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def copy_ends(settings: Settings) -> dict[int, int]:
    store = open_store(settings.clickhouse)
    try:
        return redrives.copy_ends(store)
    finally:
        store.close()


def test_list_show_and_redrive_after_a_meter_is_added_count_once(
    broker: TansuBroker,
    emulator: EmulatorServer,
    tmp_path: Path,
    unique: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = config(broker, emulator, tmp_path, unique)
    conf, settings = write(body, tmp_path / "a.yaml")
    k = settings.kafka
    broker.create_topics({k.topic: 2, k.dlq_topic: 1, k.late_topic: 1})
    now = int(time.time() * 1000)
    cus = f"cus_{unique}_"
    ends = Ends()
    p = UsageProducer({"bootstrap.servers": broker.bootstrap}, k.topic)
    truth: dict[tuple[str, str], Decimal] = {}
    for i in range(20):
        p.send(event_id=f"a{i}", event_name="api_call", customer_id=f"{cus}{i % 2}", value=1,
               timestamp_ms=now - i, on_delivery=ends)  # fmt: skip
        key = (f"{cus}{i % 2}", "api_calls")
        truth[key] = truth.get(key, Decimal(0)) + 1
    gpu: dict[tuple[str, str], Decimal] = {}
    for i in range(15):  # no meter for these yet: dead letters, reason unknown_meter
        c = f"{cus}{i % 3}"
        p.send(event_id=f"g{i}", event_name="gpu_seconds", customer_id=c, value=i + 1,
               timestamp_ms=now - i, on_delivery=ends)  # fmt: skip
        gpu[(c, "gpu_seconds")] = gpu.get((c, "gpu_seconds"), Decimal(0)) + i + 1
    # older than the others by more than the allowed lateness (1 hour): late when re-driven
    p.send(event_id="g-old", event_name="gpu_seconds", customer_id=f"{cus}0", value=100,
           timestamp_ms=now - 3 * 3600_000, on_delivery=ends)  # fmt: skip
    for i in range(2):
        p.send_raw(b"junk", b"\x00\x00\x00\x00\x02not-avro-%d" % i, partition=i, on_delivery=ends)
    assert p.flush() == 0
    run_until_drained(settings, ends.ends, timeout=60, quiet=True)

    # list: filters, limit, formats
    code, out, _ = dlq(capsys, conf, "list")
    assert code == 0 and "18 dead letters" in out and "more matched" not in out, out
    code, out, _ = dlq(capsys, conf, "list", "--reason", "unknown_meter", "--limit", "5")
    assert code == 0 and "5 dead letters; 11 more matched" in out
    code, out, _ = dlq(capsys, conf, "list", "--meter", "gpu_seconds", "--format", "json")
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 16 and {r["event_name"] for r in records} == {"gpu_seconds"}
    assert {r["reason"] for r in records} == {"unknown_meter"}
    code, out, _ = dlq(capsys, conf, "list", "--reason", "avro_decode_error", "--format", "csv")
    lines = out.splitlines()
    assert lines[0].startswith("which,topic,partition,offset") and len(lines) == 3, out
    one_partition = [r for r in records if r["partition"] == 0]
    code, out, _ = dlq(capsys, conf, "list", "--meter", "gpu_seconds", "--partition", "0",
                       "--format", "json")  # fmt: skip
    assert len(out.splitlines()) == len(one_partition)
    code, out, _ = dlq(capsys, conf, "list", "--until", "1h")
    assert code == 0 and "0 dead letters" in out
    code, _, err = dlq(capsys, conf, "list", "--since", "yesterday")
    assert code == 2 and "not a time" in err and "Traceback" not in err

    # show: decoded where it decodes, a hex dump where it does not
    code, out, _ = dlq(capsys, conf, "show", records[0]["which"])
    assert (
        code == 0
        and "reason       unknown_meter" in out
        and "wire header  magic 0, schema id" in out
    )
    assert "event_name   gpu_seconds" in out
    code, out, _ = dlq(capsys, conf, "list", "--reason", "avro_decode_error", "--format", "json")
    junk = json.loads(out.splitlines()[0])["which"]
    code, out, _ = dlq(capsys, conf, "show", junk)
    assert "hex (the payload does not decode)" in out and "not-avro" in out
    code, _, err = dlq(capsys, conf, "show", "0:999999")
    assert code == 2 and "no dead letter" in err

    # the meter is configured (and exists in Stripe); a dry run says what would happen
    stripe.StripeClient(STRIPE_KEY, base_addresses={"api": emulator.url}).v1.billing.meters.create(
        {
            "display_name": "gpu",
            "event_name": "gpu_seconds",
            "default_aggregation": {"formula": "sum"},
        }
    )
    conf_b, settings_b = write({**body, "meters": [*METERS, GPU]}, tmp_path / "b.yaml")
    code, out, _ = dlq(capsys, conf_b, "redrive", "--dry-run")
    assert code == 0 and "would re-drive 18 of 18" in out
    assert "15  counts in gpu_seconds" in out
    assert "1  late for gpu_seconds" in out
    assert "2  still invalid: avro_decode_error" in out
    assert copy_ends(settings_b) == {}  # nothing sent

    code, out, err = dlq(capsys, conf_b, "redrive")
    assert code == 0 and "re-drove 18 dead letters" in out, err
    run_until_drained(settings_b, copy_ends(settings_b), timeout=60, quiet=True)
    want = {**truth, **gpu}

    def ours(t: dict[tuple[str, str], Decimal]) -> dict[tuple[str, str], Decimal]:
        return {key: v for key, v in t.items() if key[0].startswith(cus)}

    store = open_store(settings_b.clickhouse)
    try:
        assert ours(clickhouse_totals(store, settings_b.meters)) == want
        late = store.query("SELECT event_id FROM late_events FINAL")
        assert [r[0] for r in late] == ["g-old"]
    finally:
        store.close()
    assert ours(stripe_totals(settings_b, emulator.url)) == want

    # what failed again is a dead letter with its (new) reason, linked to the original
    code, out, _ = dlq(capsys, conf_b, "list", "--reason", "avro_decode_error", "--format", "json")
    rows = [json.loads(line) for line in out.splitlines()]
    copies = [r for r in rows if r["redrive_of"]]
    assert len(copies) == 2 and all(r["redrive"].startswith("copy of") for r in copies)
    originals = {r["redrive_of"] for r in copies}
    assert originals == {
        f"{k.topic}/{r['partition']}/{r['offset']}" for r in rows if not r["redrive_of"]
    }

    # a second run sends nothing already sent; --again sends copies that count once more: 0
    code, out, _ = dlq(capsys, conf_b, "redrive", "--reason", "unknown_meter")
    assert "re-driving 0 of 16" in out and "16  already re-driven" in out
    before = copy_ends(settings_b)
    code, out, _ = dlq(capsys, conf_b, "redrive", "--reason", "unknown_meter", "--again")
    assert code == 0 and "15  already counted in gpu_seconds (a duplicate)" in out
    after = copy_ends(settings_b)
    assert after != before
    run_until_drained(settings_b, after, timeout=60, quiet=True)
    store = open_store(settings_b.clickhouse)
    try:
        assert ours(clickhouse_totals(store, settings_b.meters)) == want
    finally:
        store.close()
    assert ours(stripe_totals(settings_b, emulator.url)) == want


def run_cli(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consumer.cli", "--config", str(conf), *args],
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_flood_stops_with_one_line_and_a_release_lets_exactly_that_range_through(
    broker: TansuBroker,
    emulator: EmulatorServer,
    tmp_path: Path,
    unique: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    body = config(
        broker, emulator, tmp_path, unique,
        pipeline={"invalid_ratio_min_messages": 50}, stripe={"enabled": False},
    )  # fmt: skip
    conf, settings = write(body, tmp_path / "c.yaml")
    k = settings.kafka
    broker.create_topics({k.topic: 1, k.dlq_topic: 1, k.late_topic: 1})
    p = UsageProducer({"bootstrap.servers": broker.bootstrap}, k.topic)

    def junk(n: int, tag: bytes) -> None:
        for i in range(n):
            p.send_raw(b"k", b"\x00\x00\x00\x00\x02not-avro-%s-%d" % (tag, i))
        assert p.flush() == 0

    junk(120, b"a")
    first = run_cli(conf, "run")
    assert first.returncode == 4
    assert "Traceback" not in first.stderr
    line = first.stderr.strip().splitlines()[-1]
    assert "partition 0 offsets 0-119: 120 of 120 messages invalid (avro_decode_error)" in line
    command = line.split("carry on: ")[1]
    assert command.startswith(f"usage-consumer --config {conf} dlq release --partition 0 ")
    assert "--from 0 --to 119" in command

    junk(120, b"b")  # a second flood after the released range: it still stops
    code, out, _ = dlq(capsys, conf, "release", "--partition", "0", "--from", "0", "--to", "119",
                       "--reason", "a producer wrote text")  # fmt: skip
    assert code == 0 and "released" in out and "0-119 (120 offsets)" in out
    second = run_cli(conf, "run")
    assert second.returncode == 4 and "Traceback" not in second.stderr
    assert "--from 120 --to 239" in second.stderr.strip().splitlines()[-1]
    store = open_store(settings.clickhouse)
    try:
        offsets = [
            int(r[0]) for r in store.query("SELECT offset FROM dead_letters FINAL ORDER BY 1")
        ]
        who = store.query("SELECT who, reason FROM dlq_releases FINAL")
    finally:
        store.close()
    assert offsets == list(range(120))  # exactly the released range, not one offset more
    assert who[0][1] == "a producer wrote text"
    # Re-driven copies that fail again are not a flood: the consumer dead-letters them and
    # carries on (the second range released too, every dead letter re-driven while the
    # messages are still broken).
    code, _, _ = dlq(capsys, conf, "release", "--partition", "0", "--from", "120", "--to", "239")
    code, out, _ = dlq(capsys, conf, "redrive", "--reason", "avro_decode_error")
    assert code == 0 and "120  still invalid: avro_decode_error" in out
    run_until_drained(settings, copy_ends(settings), timeout=60, quiet=True)
    store = open_store(settings.clickhouse)
    try:
        dead = store.query(
            "SELECT count(), countIf(indexOf(header_keys, 'usage-consumer.redrive-of') > 0) "
            "FROM dead_letters FINAL"
        )
    finally:
        store.close()
    assert [int(x) for x in dead[0]] == [360, 120]  # 0-239 as released, 120 copies
