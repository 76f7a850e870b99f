"""The run-path fuzz: seeded random and mutated messages (tests/fuzz/messages.py) through a real
Tansu broker into a real `usage-consumer run` process (chDB store, the Stripe emulator, a
schema registry stand-in serving extra writer schemas), then checked against the generator's
own oracle (tests/fuzz/model.py):

- the process, stopped by SIGTERM once it has committed a range and started again, stays
  alive until it is drained, and each stop is clean (exit 0);
- dead letters, in the `dead_letters` table and on the dead-letter topic, are exactly the
  bad messages by (partition, offset), each with a non-empty reason; late events exactly the
  late ones;
- the ledger holds exactly the accepted events, usage_hourly equals the oracle's hourly
  totals, and the emulator holds the whole part of each sum and each newest `last` value.

`python -m tests.fuzz run --messages N --seed S`; tests/integration/test_fuzz_run.py runs it
CI-sized.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import stripe
from confluent_kafka import Consumer, Producer, TopicPartition

from consumer.decode.schemas import SCHEMAS_DIR
from consumer.local.broker import TansuBroker, die_with_parent, free_port
from consumer.local.emulator import EmulatorOptions, EmulatorServer, serve
from tests.chaos.registry import Registry
from tests.fuzz.checks import DLQ, LATE, TOPIC, check_dlq, check_store, check_stripe
from tests.fuzz.messages import Generator, Message, expect
from tests.fuzz.model import METERS

KEY = "sk_test_fuzz"
GROUP = "fuzz"


@dataclass
class Report:
    seed: int
    messages: int
    kinds: Counter[str] = field(default_factory=Counter)
    numbers: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        n = self.numbers
        out = [
            f"fuzz run: seed {self.seed}, {self.messages} messages, batches of "
            f"{n.get('batch', 0):.0f}, {'the C decoder' if n.get('fast') else 'fastavro only'} "
            f"({', '.join(f'{k} {v}' for k, v in self.kinds.most_common())})",
            f"  dead letters {n.get('dead', 0):.0f}, late {n.get('late', 0):.0f}, "
            f"accepted {n.get('accepted', 0):.0f}, copies {n.get('copies', 0):.0f}; "
            f"produced in {n.get('produce_s', 0):.1f} s, drained in {n.get('drain_s', 0):.1f} s, "
            f"stopped in {n.get('stop_s', 0):.1f} s",
        ]
        out += [f"  FAIL {p}" for p in self.problems] or ["  OK"]
        return out


def schemas() -> dict[int, bytes]:
    """Registry bodies beyond the packaged ids: another scale (20), an extra field the reader
    skips (21), more digits than the reader's (22); the oracle's model.LAYOUTS."""
    v2 = json.loads((SCHEMAS_DIR / "usage_event.v2.avsc").read_text())

    def with_value(precision: int, scale: int) -> dict[str, Any]:
        fields = [
            {**f, "type": {**f["type"], "precision": precision, "scale": scale}}
            if f["name"] == "value"
            else f
            for f in v2["fields"]
        ]
        return {**v2, "fields": fields}

    attempt = {"name": "attempt", "type": "int"}
    extra = {**v2, "fields": [*v2["fields"][:3], attempt, *v2["fields"][3:]]}
    docs = {20: with_value(38, 2), 21: extra, 22: with_value(40, 9)}
    return {k: json.dumps({"schema": json.dumps(v)}).encode() for k, v in docs.items()}


@contextmanager
def _services() -> Iterator[tuple[TansuBroker, EmulatorServer, Registry]]:
    with ExitStack() as stack:
        broker = stack.enter_context(TansuBroker())
        emu = serve("127.0.0.1", 0, EmulatorOptions(seed=1))
        stack.callback(emu.stop)
        client = stripe.StripeClient(KEY, base_addresses={"api": emu.url})
        for meter, agg in METERS.values():
            formula = "last" if agg == "last" else "sum"
            client.v1.billing.meters.create(
                {
                    "display_name": meter,
                    "event_name": meter,
                    "default_aggregation": {"formula": formula},
                }
            )
        registry = Registry()
        stack.callback(registry.stop)
        registry.bodies.update(schemas())
        yield broker, emu, registry


def produce(bootstrap: str, messages: list[Message], record_ms: int) -> dict[int, int]:
    """Each message to its partition with the generator's record time; sets its offset from
    the delivery report and returns each partition's end offset."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 20}
    )
    failures: list[str] = []

    def delivered(m: Message) -> Callable[[Any, Any], None]:
        def report(err: Any, msg: Any) -> None:
            if err is not None:
                failures.append(str(err))
            else:
                m.offset = int(msg.offset())

        return report

    for m in messages:
        while True:
            try:
                producer.produce(
                    TOPIC,
                    value=m.value,
                    key=m.key,
                    partition=m.partition,
                    timestamp=record_ms,
                    on_delivery=delivered(m),
                )
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(60) or failures:
        raise RuntimeError(f"produce failed: {failures[:3]}")
    ends: dict[int, int] = {}
    for m in messages:
        ends[m.partition] = max(ends.get(m.partition, 0), m.offset + 1)
    return ends


def _env(
    broker: TansuBroker,
    emu: EmulatorServer,
    registry: Registry,
    home: Path,
    port: int,
    batch: int,
    fast: bool,
) -> dict[str, str]:
    return {
        **os.environ,
        "USAGE_CONSUMER_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
        "USAGE_CONSUMER_KAFKA__TOPIC": TOPIC,
        "USAGE_CONSUMER_KAFKA__DLQ_TOPIC": DLQ,
        "USAGE_CONSUMER_KAFKA__LATE_TOPIC": LATE,
        "USAGE_CONSUMER_KAFKA__GROUP_ID": GROUP,
        "USAGE_CONSUMER_KAFKA__CONSUMER_LIBRDKAFKA": json.dumps(
            {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}
        ),
        "USAGE_CONSUMER_SCHEMA__REGISTRY_URL": registry.url,
        "USAGE_CONSUMER_SCHEMA__FAST_DECODER": str(fast).lower(),
        "USAGE_CONSUMER_CLICKHOUSE__CHDB_PATH": str(home / "chdb"),
        "USAGE_CONSUMER_STRIPE__API_KEY": KEY,
        "USAGE_CONSUMER_STRIPE__API_BASE": emu.url,
        "USAGE_CONSUMER_STRIPE__METER_EVENTS_BASE": emu.url,
        "USAGE_CONSUMER_STRIPE__REQUESTS_PER_SECOND": "1000",
        "USAGE_CONSUMER_STRIPE__POLL_INTERVAL_SECONDS": "0.2",
        "USAGE_CONSUMER_PIPELINE__BATCH_MAX_MESSAGES": str(batch),
        "USAGE_CONSUMER_PIPELINE__METRICS_HOST": "127.0.0.1",
        "USAGE_CONSUMER_PIPELINE__METRICS_PORT": str(port),
    }


def _metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            body = r.read().decode()
    except OSError:
        return None
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _committed(bootstrap: str, ends: dict[int, int]) -> bool:
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": GROUP})
    try:
        got = probe.committed([TopicPartition(TOPIC, p) for p in ends], timeout=10)
    finally:
        probe.close()
    return all(tp.offset == ends[tp.partition] for tp in got)


def _consume(
    env: dict[str, str],
    out: IO[bytes],
    until: Callable[[subprocess.Popen[bytes]], str],
    report: Report,
) -> str:
    """`usage-consumer run` until `until` returns ("" when it got there, else what went
    wrong), then SIGTERM: it must exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumer.cli", "run"],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,  # no orphan when the fuzz itself is killed
    )
    try:
        trouble = until(proc)
        started = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            if proc.returncode != 0 and not trouble:
                trouble = f"SIGTERM: exit code {proc.returncode}, not 0"
        report.numbers["stop_s"] = max(report.numbers.get("stop_s", 0), time.monotonic() - started)
        return trouble
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _until_committed(
    proc: subprocess.Popen[bytes], env: dict[str, str], timeout: float = 60
) -> str:
    """Until the process has committed a range (so the SIGTERM meets work in flight)."""
    port = int(env["USAGE_CONSUMER_PIPELINE__METRICS_PORT"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"the consumer died (exit code {proc.returncode})"
        if (_metric(port, "usage_consumer_ranges_committed_total") or 0) >= 1:
            return ""
        time.sleep(0.1)
    return f"no range committed within {timeout:.0f} s"


def drain(
    proc: subprocess.Popen[bytes],
    env: dict[str, str],
    bootstrap: str,
    ends: dict[int, int],
    timeout: float,
) -> str:
    """Wait until every offset is committed, every partition is owned and the outbox reads
    idle three times in a row; "" then, else what went wrong."""
    port = int(env["USAGE_CONSUMER_PIPELINE__METRICS_PORT"])
    idle = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"the consumer died (exit code {proc.returncode})"
        time.sleep(0.3)
        owned = _metric(port, "usage_consumer_partitions_owned")
        if owned != len(ends) or not _committed(bootstrap, ends):
            idle = 0
            continue
        idle = idle + 1 if _metric(port, "usage_consumer_stripe_outbox_idle") == 1.0 else 0
        if idle >= 3:
            return ""
    return f"not drained within {timeout:.0f} s"


def run(
    messages: int,
    seed: int,
    workdir: Path,
    partitions: int = 3,
    timeout: float = 240,
    now_ms: int | None = None,
    batch: int = 0,
    fast: bool | None = None,
    log: Callable[[str], None] = print,
) -> Report:
    """One fuzz run in `workdir` (its store and the consumer's log); never raises for a
    finding, returns it in the report. The record time is `now_ms`, by default the current
    hour: mutated event times are judged against it, so (seed, now) replays a run exactly.
    `batch`: pipeline.batch_max_messages (2000 by default); `fast`:
    the C decoder on, or fastavro only, by default on in three runs of four."""
    now = now_ms if now_ms is not None else int(time.time()) // 3600 * 3_600_000
    batch = batch or 2000  # smaller: more ranges and ledger questions, a slower run
    fast = fast if fast is not None else random.Random(seed + 2).random() < 0.75
    log(
        f"fuzz run: seed {seed}, record time {now} (replay: python -m tests.fuzz run "
        f"--messages {messages} --seed {seed} --now-ms {now} --partitions {partitions} "
        f"--batch {batch} --decoder {'fast' if fast else 'reference'})"
    )
    report = Report(seed, messages)
    home = workdir / f"fuzz-{seed}"
    home.mkdir(parents=True, exist_ok=False)
    gen = Generator(seed, partitions, now, customers=max(30, messages // 300))
    plan = gen.messages(messages)
    report.kinds = gen.counts
    with _services() as (broker, emu, registry):
        broker.create_topics({TOPIC: partitions, DLQ: 1, LATE: 1})
        started = time.monotonic()
        ends = produce(broker.bootstrap, plan, now)
        report.numbers["produce_s"] = time.monotonic() - started
        expected = expect(plan)
        report.numbers |= {
            "batch": batch,
            "fast": fast,
            "dead": len(expected.dead),
            "late": len(expected.late),
            "accepted": len(expected.accepted),
            "copies": expected.copies,
        }
        started = time.monotonic()
        env = _env(broker, emu, registry, home, free_port(), batch, fast)
        with open(home / "consumer.log", "wb") as out:
            # the first process is stopped mid-stream, once a range is committed
            trouble = _consume(env, out, lambda p: _until_committed(p, env), report)
            if not trouble:
                again = _env(broker, emu, registry, home, free_port(), batch, fast)
                until = lambda p: drain(p, again, broker.bootstrap, ends, timeout)  # noqa: E731
                trouble = _consume(again, out, until, report)
            report.numbers["drain_s"] = time.monotonic() - started
            if trouble:
                report.problems.append(trouble)
        if report.problems:
            tail = (home / "consumer.log").read_bytes()[-3000:].decode(errors="replace")
            report.problems.append(f"the consumer's log ends:\n{tail}")
        by_coord = {(m.partition, m.offset): m for m in plan}
        report.problems += check_dlq(broker.bootstrap, expected)
        report.problems += check_stripe(emu.url, expected)
    report.problems += check_store(home, expected, by_coord)
    return report
