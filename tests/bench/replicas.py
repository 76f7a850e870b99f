"""`make bench`, replicas: phase (c) by one consumer process and by two processes of one
consumer group sharing one store, on the same data in the same run.

Both runs go through the server backend, so they differ only in the number of processes:
the store is a chDB database served by the ClickHouse HTTP endpoint of the tests
(tests/support/clickhouse_http.py), which runs one statement at a time. Each process
builds its pipeline, then waits for the others; the time runs from the start signal to
the group's last committed offset with every process's windows recomputed. Group joins
and the rebalance when the second member arrives are inside it, as in a deployment.
Both runs must end with ClickHouse equal to the ground truth.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import threading
import time
from decimal import Decimal
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from consumer.app import build_pipeline
from consumer.clock import SystemClock
from consumer.config import load_settings
from consumer.local.broker import TansuBroker
from consumer.local.demo import produce_messages
from consumer.local.sample import generate
from consumer.metrics import Metrics
from consumer.ops.health import Health
from consumer.ops.totals import clickhouse_totals
from consumer.store.chdb import ChdbBackend
from consumer.store.migrations import migrate
from tests.support.clickhouse_http import running

DATABASE = "usage"
# What bounds the ratio here (results.json says it beside the figures).
BOUND = (
    "2 cores shared by the broker, the HTTP endpoint over chDB (one statement at a time) "
    "and the processes: a second process adds CPU for decoding and classifying, not store "
    "throughput"
)


def member(
    bootstrap: str,
    topic: str,
    ends: dict[int, int],
    host: str,
    port: int,
    group: str,
    ready: Event,
    go: Event,
    out: Any,
) -> None:
    """One `usage-consumer run` process's pipeline (Stripe off), started on `go`, stopped
    once the group has committed every offset and its own windows are recomputed."""
    settings = load_settings(
        kafka={
            "bootstrap_servers": bootstrap,
            "topic": topic,
            "group_id": group,
            "consumer_librdkafka": {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"},
        },
        clickhouse={"backend": "server", "host": host, "port": port, "database": DATABASE},
        stripe={"enabled": False},
        pipeline={"metrics_port": 0},
    )
    clock = SystemClock()
    run = build_pipeline(settings, clock, Metrics(), Health(clock))
    watcher = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    stop = threading.Event()
    worker = threading.Thread(target=run.run, args=(stop,), name="pipeline")
    parts = [TopicPartition(topic, p) for p in ends]
    ready.set()
    go.wait()
    started = time.perf_counter()
    worker.start()
    try:
        while worker.is_alive() and time.perf_counter() - started < 1800:
            time.sleep(0.2)
            committed = watcher.committed(parts, timeout=10)
            if all(tp.offset >= ends[tp.partition] for tp in committed) and not run.rollup.behind:
                break
        seconds = time.perf_counter() - started
    finally:
        stop.set()
        worker.join()
        watcher.close()
    out.put(seconds)


def measure(
    bootstrap: str, topic: str, ends: dict[int, int], workdir: str, processes: int
) -> dict[str, Any]:
    """(c) by `processes` processes of one group on a fresh store; its rate and totals."""
    home = Path(workdir)
    shutil.rmtree(home, ignore_errors=True)
    store = ChdbBackend(home / "chdb", DATABASE)
    try:
        migrate(store)  # as the migration job does, before any process starts
    finally:
        store.close()
    ctx = mp.get_context("spawn")
    with running(home / "chdb") as endpoint:
        ready = [ctx.Event() for _ in range(processes)]
        go, out = ctx.Event(), ctx.Queue()
        group = f"replicas-{processes}"
        procs = [
            ctx.Process(
                target=member,
                args=(bootstrap, topic, ends, endpoint.host, endpoint.port, group, r, go, out),
            )
            for r in ready
        ]
        for p in procs:
            p.start()
        for r in ready:
            if not r.wait(120):
                raise RuntimeError("a replica never got ready")
        go.set()
        seconds = max(out.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join(60)
    store = ChdbBackend(home / "chdb", DATABASE)
    try:
        totals = clickhouse_totals(store, load_settings().meters)
    finally:
        store.close()
    total = sum(ends.values())
    return {
        "processes": processes,
        "events": total,
        "seconds": round(seconds, 3),
        "events_per_s": round(total / seconds),
        "totals": {f"{c}|{m}": str(v) for (c, m), v in totals.items()},
    }


def compare(bootstrap: str, topic: str, ends: dict[int, int], workdir: Path) -> dict[str, Any]:
    """One process, then two, on the same data; rates, ratio and totals of each."""
    one = measure(bootstrap, topic, ends, str(workdir / "replicas-1"), 1)
    print(f"bench: (c) one process (server backend)   {one['events_per_s']:>9,} events/s")
    two = measure(bootstrap, topic, ends, str(workdir / "replicas-2"), 2)
    print(f"bench: (c) two processes (server backend) {two['events_per_s']:>9,} events/s")
    return {
        "one_process": one,
        "two_processes": two,
        "two_over_one": round(two["events_per_s"] / one["events_per_s"], 3),
    }


def equals_truth(totals: dict[str, str], truth: dict[tuple[str, str], Decimal]) -> bool:
    """ClickHouse's totals (customer|meter -> value) against the sample's ground truth."""
    want = {f"{c}|{m}": v.normalize() for (c, m), v in truth.items()}
    return {k: Decimal(v).normalize() for k, v in totals.items()} == want


def main() -> int:
    """`python -m tests.bench.replicas [events]`: this part of `make bench` alone."""
    events = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    workdir = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    try:
        with TansuBroker() as broker:
            broker.create_topics({"usage.events": 6, "usage.dlq": 1, "usage.late": 1})
            sample = generate(events, 10_000, 6, int(time.time() * 1000), 7)
            ends = produce_messages(sample.messages, broker.bootstrap, "usage.events")
            result = compare(broker.bootstrap, "usage.events", ends, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    exact = True
    for key in ("one_process", "two_processes"):
        run = result[key]
        run["equals_ground_truth"] = equals_truth(run.pop("totals"), sample.truth)
        exact = exact and run["equals_ground_truth"]
    print(json.dumps(result, indent=2))
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
