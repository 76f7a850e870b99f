"""How long a restart stops consumption: SIGKILL and restart, SIGTERM and restart, and a
rolling update of two replicas (a new pod up and ready before an old one gets SIGTERM, as
a Deployment with maxUnavailable 0 does), each with dynamic and with static group
membership (`kafka.group_instance_id`).

    python -m tests.bench.handover [--session-ms 6000] [--out tests/bench/handover.json]

Real `usage-consumer run` processes on the Tansu broker share one store through the
ClickHouse HTTP endpoint over chDB, with Stripe off. Events trickle into every partition
while a watcher reads the group's committed offsets every 50 ms. A restart's cost is the
longest time any partition's committed offset stood still around it; the quiet baseline
(a batch and a commit) is measured the same way before the first fault and printed."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from confluent_kafka import Consumer, Producer, TopicPartition

from consumer.local.broker import TansuBroker, free_port
from consumer.local.sample import generate
from consumer.store.chdb import ChdbBackend
from consumer.store.migrations import migrate
from tests.support.clickhouse_http import Endpoint, running

PARTITIONS = 4
LOG = sys.stderr.buffer  # the processes' own lines, for a run that goes wrong
RATE = 200  # events a second, spread over the partitions


@dataclass
class Watch:
    """Every advance of each partition's committed offset, by monotonic time."""

    advances: dict[int, list[float]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, bootstrap: str, group: str, topic: str) -> None:
        probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        last: dict[int, int] = {}
        try:
            while not self.stop.wait(0.05):
                tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
                try:
                    got = probe.committed(tps, timeout=5)
                except Exception:
                    continue
                now = time.monotonic()
                for tp in got:
                    if tp.offset > last.get(tp.partition, -1):
                        last[tp.partition] = tp.offset
                        self.advances.setdefault(tp.partition, []).append(now)
        finally:
            probe.close()

    def pause(self, start: float, end: float) -> float:
        """The longest stand-still of any partition that overlaps [start, end]."""
        worst = 0.0
        for times in self.advances.values():
            before = [t for t in times if t <= start]
            after = [t for t in times if t > start]
            prev = before[-1] if before else start
            for t in after:
                worst = max(worst, t - prev)
                prev = t
                if t > end:
                    break
        return worst

    def quiet(self, start: float, end: float) -> float:
        """The longest stand-still of any partition between two advances within [start, end]."""
        worst = 0.0
        for times in self.advances.values():
            inside = [t for t in times if start <= t <= end]
            worst = max([worst, *(b - a for a, b in itertools.pairwise(inside))])
        return worst


def trickle(bootstrap: str, topic: str, stop: threading.Event) -> None:
    sample = generate(60_000, 20, PARTITIONS, int(time.time() * 1000), seed=3)
    good = [m for m in sample.messages if m.partition is not None]
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    i = 0
    while not stop.wait(0.05):
        for m in good[i : i + RATE // 20]:
            producer.produce(topic, m.value, m.key, partition=m.partition)
        i += RATE // 20
        producer.poll(0)
    producer.flush(10)


class Fleet:
    """The consumer processes, each with its own metrics port."""

    def __init__(
        self, bootstrap: str, topic: str, group: str, ep: Endpoint, session: int, log: IO[bytes]
    ) -> None:
        self.bootstrap, self.topic, self.group, self.ep = bootstrap, topic, group, ep
        self.session, self.log = session, log

    def start(self, instance: str | None) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        env = {
            **os.environ,
            "USAGE_CONSUMER_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "USAGE_CONSUMER_KAFKA__TOPIC": self.topic,
            "USAGE_CONSUMER_KAFKA__DLQ_TOPIC": f"{self.topic}.dlq",
            "USAGE_CONSUMER_KAFKA__LATE_TOPIC": f"{self.topic}.late",
            "USAGE_CONSUMER_KAFKA__GROUP_ID": self.group,
            "USAGE_CONSUMER_KAFKA__CONSUMER_LIBRDKAFKA": json.dumps(
                {"session.timeout.ms": str(self.session), "heartbeat.interval.ms": "1000"}
            ),
            "USAGE_CONSUMER_CLICKHOUSE__BACKEND": "server",
            "USAGE_CONSUMER_CLICKHOUSE__HOST": self.ep.host,
            "USAGE_CONSUMER_CLICKHOUSE__PORT": str(self.ep.port),
            "USAGE_CONSUMER_CLICKHOUSE__USERNAME": self.ep.user,
            "USAGE_CONSUMER_CLICKHOUSE__PASSWORD": self.ep.password,
            "USAGE_CONSUMER_STRIPE__ENABLED": "false",
            "USAGE_CONSUMER_PIPELINE__METRICS_HOST": "127.0.0.1",
            "USAGE_CONSUMER_PIPELINE__METRICS_PORT": str(port),
        }
        if instance is not None:
            env["USAGE_CONSUMER_KAFKA__GROUP_INSTANCE_ID"] = instance
        cmd = [sys.executable, "-m", "consumer.cli", "run"]
        return subprocess.Popen(cmd, env=env, stdout=self.log, stderr=self.log), port


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def wait(cond: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def consuming(watch: Watch, since: float) -> bool:
    """Every partition's committed offset moved after `since`."""
    return len(watch.advances) == PARTITIONS and all(t[-1] > since for t in watch.advances.values())


class NeverResumed(Exception):
    """Some partition was not consumed again within the limit."""


def resumed(watch: Watch, limit: float = 120) -> None:
    try:
        wait(lambda: consuming(watch, time.monotonic() - 0.5), "consuming after", limit)
    except RuntimeError as exc:
        raise NeverResumed(str(exc)) from None


def scenario(
    name: str, static: bool, broker: TansuBroker, ep: Endpoint, session: int
) -> tuple[float, float]:
    topic = f"handover-{name}-{'static' if static else 'dynamic'}"
    broker.create_topics({topic: PARTITIONS, f"{topic}.dlq": 1, f"{topic}.late": 1})
    fleet = Fleet(broker.bootstrap, topic, topic, ep, session, LOG)
    watch, stop = Watch(), threading.Event()
    threads = [
        threading.Thread(target=watch.run, args=(broker.bootstrap, topic, topic)),
        threading.Thread(target=trickle, args=(broker.bootstrap, topic, stop)),
    ]
    for t in threads:
        t.start()
    procs: list[subprocess.Popen[bytes]] = []

    def up(instance: str) -> int:
        proc, port = fleet.start(instance if static else None)
        procs.append(proc)
        wait(lambda: ready(port), f"{instance} ready")
        return port

    try:
        if name == "rolling":
            up("pod-a"), up("pod-b")
            wait(lambda: consuming(watch, time.monotonic() - 1), "both consuming")
            time.sleep(5)
            start = time.monotonic()
            for new, old in (("pod-c", 0), ("pod-d", 1)):  # surge one, then retire one
                up(new)
                procs[old].send_signal(signal.SIGTERM)
                procs[old].wait(60)
            resumed(watch)
        else:
            up("pod-a")
            wait(lambda: consuming(watch, time.monotonic() - 1), "consuming")
            time.sleep(5)
            start = time.monotonic()
            sig = signal.SIGKILL if name == "sigkill" else signal.SIGTERM
            procs[0].send_signal(sig)
            procs[0].wait(60)
            up("pod-a")  # the container restarted in the same pod: the same name
            resumed(watch)
        time.sleep(3)
        baseline = watch.quiet(start - 5, start)  # a batch and a commit, undisturbed
        return watch.pause(start, time.monotonic()), baseline
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        stop.set()
        watch.stop.set()
        for t in threads:
            t.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--session-ms", type=int, default=6000)
    ap.add_argument("--out", type=Path, default=Path("tests/bench/handover.json"))
    args = ap.parse_args()
    results: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory() as tmp, TansuBroker() as broker:
        store = ChdbBackend(Path(tmp) / "chdb", "usage")
        migrate(store)
        store.close()
        with running(Path(tmp) / "chdb") as ep:
            for name in ("sigkill", "sigterm", "rolling"):
                for static in (False, True):
                    key = f"{name}/{'static' if static else 'dynamic'}"
                    try:
                        pause, baseline = scenario(name, static, broker, ep, args.session_ms)
                    except NeverResumed as exc:
                        print(f"{key:18} {exc}")
                        results[key] = None
                        continue
                    results[key] = round(pause, 1)
                    print(
                        f"{key:18} partitions stood still up to {pause:5.1f} s "
                        f"(undisturbed: {baseline:.1f} s)"
                    )
    args.out.write_text(json.dumps({"session_ms": args.session_ms, **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
