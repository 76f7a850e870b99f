"""`make demo`: the whole pipeline on one machine, checked against ground truth.

Tansu broker + chDB store under ./.demo/ + the Stripe emulator; a seeded sample with
duplicates, late, future-dated and undecodable messages; the consumer and emitter run
until drained; then ground truth, ClickHouse and the emulator must agree exactly.
"""

from __future__ import annotations

import gc
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import stripe

from consumer.app import build_pipeline
from consumer.clock import SystemClock
from consumer.config import Settings, load_settings
from consumer.local.broker import TansuBroker
from consumer.local.sample import Message, Sample, generate
from consumer.metrics import Metrics
from consumer.ops.health import Health
from consumer.ops.progress import Progress
from consumer.ops.totals import (
    Totals,
    clickhouse_totals,
    correction_counts,
    format_table,
    late_event_ids,
    side_counts,
)
from consumer.producer import UsageProducer
from consumer.store import Backend, open_store

STRIPE_KEY = "sk_test_demo"
# The demo's topics keep a week, as Kafka does by default (doctor checks it is set and long
# enough; Tansu records it without enforcing it).
TOPIC_CONFIG = {"retention.ms": str(7 * 86_400_000)}


def create_meters(settings: Settings, api_url: str) -> None:
    """Create the Stripe meters the configuration bills (the emulator starts empty)."""
    from consumer.ops.meters_sync import accounts_of, apply, plan

    client = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": api_url})
    actions = plan(client, settings.meters, accounts_of(settings.stripe))
    apply(client, actions, settings.meters)


def preflight(settings: Settings) -> None:
    """What an operator does before the first `run`: the schema and the control topic, then
    `doctor`'s table (the demo goes on whatever it says: its setup is the default one)."""
    from consumer.ingest.kafka import ensure_control_topic
    from consumer.ops.doctor.checks import run_doctor
    from consumer.ops.doctor.report import format_report
    from consumer.store.prepare import prepare_store

    store = open_store(settings.clickhouse)
    try:
        prepare_store(store, settings.clickhouse)
    finally:
        store.close()
    ensure_control_topic(settings.kafka)
    print(format_report(run_doctor(settings, SystemClock())))


def produce(sample: Sample, bootstrap: str, topic: str) -> dict[int, int]:
    """Produce the sample with a progress bar; returns each partition's end offset."""
    return produce_messages(
        sample.messages, bootstrap, topic, Progress("produce", len(sample.messages))
    )


def produce_messages(
    messages: Sequence[Message],
    bootstrap: str,
    topic: str,
    bar: Progress | None = None,
    producer: UsageProducer | None = None,
) -> dict[int, int]:
    """Produce messages to their partitions; returns the end offset (last + 1) of each.
    `producer`: one to reuse for `topic` (an idempotent producer's start is a round trip)."""
    ends: dict[int, int] = {}
    failures: list[str] = []

    def delivered(err: object, msg: object) -> None:
        if err is not None:
            failures.append(str(err))
            return
        p, o = msg.partition(), msg.offset()  # type: ignore[attr-defined]
        ends[p] = max(ends.get(p, 0), o + 1)

    producer = producer or UsageProducer({"bootstrap.servers": bootstrap}, topic)
    for i, m in enumerate(messages):
        producer.send_raw(
            m.key,
            m.value,
            partition=m.partition,
            on_delivery=delivered,
            record_time_ms=m.record_time_ms,
        )
        if bar is not None and i % 2000 == 0:
            bar.update(i)
    if producer.flush(60) or failures:
        raise RuntimeError(f"produce failed: {failures[:3]}")
    if bar is not None:
        bar.done(len(messages))
    return ends


def stripe_totals(settings: Settings, url: str) -> Totals:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{url}/_emulator/state", timeout=10) as resp:
        state = json.loads(resp.read())
    meter_of = {m.stripe_event_name: m.name for m in settings.meters if m.stripe_event_name}
    return {
        (t["customer"], meter_of[t["event_name"]]): Decimal(t["value"])
        for t in state["totals"]
        if t["event_name"] in meter_of
    }


def run_until_drained(
    settings: Settings,
    ends: dict[int, int],
    timeout: float,
    metrics: Metrics | None = None,
    stop_at: int | None = None,
    quiet: bool = False,
    store: Backend | None = None,
) -> int:
    """Run consumer and emitter until every offset in `ends` is visible (committed, and its
    windows recomputed) and the emitter found nothing left to send (or, with `stop_at`,
    until that many offsets are, then stop gracefully). Returns the number of offsets."""
    clock = SystemClock()
    pipeline = build_pipeline(settings, clock, metrics or Metrics(), Health(clock), store)
    stop = threading.Event()
    worker = threading.Thread(target=pipeline.run, args=(stop,), name="pipeline")
    worker.start()
    total = sum(ends.values())
    target = total if stop_at is None else min(stop_at, total)
    bar = None if quiet else Progress("consume", total)
    deadline = time.monotonic() + timeout
    done = 0
    try:
        while worker.is_alive() and time.monotonic() < deadline:
            done = sum(min(pipeline.rollup.visible.get(p, 0), e) for p, e in ends.items())
            if bar is not None:
                bar.update(done)
            if done >= target:
                break
            time.sleep(0.1)
        if bar is not None:
            bar.done(done)
        if done < target:
            raise RuntimeError(f"not drained: {done} of {target} offsets visible")
        emitter = pipeline.emitter
        if emitter is not None and stop_at is None:
            mark = emitter.cycles
            while worker.is_alive() and not emitter.drained_since(mark):
                if time.monotonic() > deadline:
                    raise RuntimeError("the emitter did not drain the outbox in time")
                time.sleep(0.1)
    finally:
        stop.set()
        worker.join()
    return done


def reconcile_run(settings: Settings, api_url: str) -> str:
    """Reconcile the whole run against the emulator's summaries; returns the verdict line."""
    from consumer.emitter.truth.summaries import SummaryReader
    from consumer.ops.reconcile import format_report, reconcile

    end = (int(time.time()) // 60 + 10) * 60  # drained: nothing is settling
    start = (end - 40 * 86400) // 3600 * 3600  # the sample spans hours; Stripe takes 35 days
    store = open_store(settings.clickhouse)
    try:
        api = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": api_url})
        summaries = SummaryReader(api, lambda: None)
        report = reconcile(store, summaries, settings.meters, start, end, window="day")
    finally:
        store.close()
    lines = format_report(report).splitlines()
    if len(lines) > 1:
        print("\n".join(lines[:-1]))
    return lines[-1]


def compare(sample: Sample, ch: Totals, st: Totals) -> tuple[list[list[str]], int]:
    rows, mismatches = [], 0
    for key in sorted(set(sample.truth) | set(ch) | set(st)):
        truth, c, s = sample.truth.get(key), ch.get(key), st.get(key)
        ok = truth is not None and truth == c == s
        mismatches += not ok
        rows.append([key[0], key[1], _fmt(truth), _fmt(c), _fmt(s), "" if ok else "MISMATCH"])
    return rows, mismatches


def _fmt(v: Decimal | None) -> str:
    return "-" if v is None else format(v.normalize(), "f")


def main(
    workdir: Path = Path(".demo"),
    events: int = 100_000,
    customers: int = 50,
    partitions: int = 3,
    seed: int = 7,
) -> int:
    from consumer.local.emulator import EmulatorOptions, serve

    shutil.rmtree(workdir / "chdb", ignore_errors=True)
    with TansuBroker() as broker:
        emulator = serve("127.0.0.1", 0, EmulatorOptions(seed=seed))
        try:
            settings = load_settings(
                kafka={
                    "bootstrap_servers": broker.bootstrap,
                    "consumer_librdkafka": {
                        "session.timeout.ms": "6000",
                        "heartbeat.interval.ms": "1000",
                    },
                },
                clickhouse={"chdb_path": str(workdir / "chdb")},
                stripe={
                    "api_key": STRIPE_KEY,
                    "api_base": emulator.url,
                    "meter_events_base": emulator.url,
                    "requests_per_second": 500,
                    "concurrency": 8,
                },
                pipeline={"metrics_port": 0},
            )
            k = settings.kafka
            broker.create_topics(
                {k.topic: partitions, k.dlq_topic: 1, k.late_topic: 1}, config=TOPIC_CONFIG
            )
            create_meters(settings, emulator.url)
            print(f"demo: seed={seed} broker={broker.bootstrap} stripe-emulator={emulator.url}")
            preflight(settings)
            now_ms = int(time.time() * 1000)
            sample = generate(events, customers, partitions, now_ms, seed, cancels=True)
            ends = produce(sample, broker.bootstrap, k.topic)
            run_until_drained(settings, ends, timeout=600)
            st = stripe_totals(settings, emulator.url)
            gc.collect()  # free the Kafka clients (held in callback cycles) before the broker stops
            verdict = reconcile_run(settings, emulator.url)
        finally:
            emulator.stop()
    store = open_store(settings.clickhouse)
    try:
        ch = clickhouse_totals(store, settings.meters)
        sides = side_counts(store)
        late_ids = late_event_ids(store)
        fixes = correction_counts(store)
    finally:
        store.close()
    rows, bad = compare(sample, ch, st)
    print(format_table(["customer", "meter", "ground truth", "clickhouse", "stripe", ""], rows))
    kinds = sample.kinds
    expected_dead = kinds["invalid"] + kinds["future"] + kinds["undecodable"]
    dead = sum(v for r, v in sides.items() if r != "late")
    print(
        f"dead letters: {dead} (expected {expected_dead}) by reason "
        f"{ {r: v for r, v in sides.items() if r != 'late'} }"
    )
    # A late copy of a duplicate whose original another partition accepted is late too;
    # it stays out of the totals either way. Every other late event must be a labelled one.
    late_copies = late_ids & sample.accepted_ids
    print(
        f"late events: {len(late_ids)} = {len(late_ids & sample.late_ids)} late "
        f"(expected {len(sample.late_ids)}) + {len(late_copies)} late duplicate copies; "
        f"duplicates produced: {kinds['duplicate']}"
    )
    # Every cancel is recorded; those of per-event usage each settled at Stripe (aggregated
    # ones settle per bucket); none came too late here, the run spans hours.
    print(
        f"cancels: {fixes['cancels']} (expected {kinds['cancel']}); taken back from Stripe: "
        f"{ {o: n for o, n in fixes.items() if o != 'cancels'} }"
    )
    side_ok = (
        fixes["cancels"] == kinds["cancel"]
        and fixes.get("late", 0) == 0
        and dead == expected_dead
        and sample.late_ids <= late_ids
        and late_ids - sample.late_ids <= sample.accepted_ids
    )
    summary = f"events={kinds['accepted']} customers={customers} meters={sample.meters}"
    print(verdict)
    if bad or not side_ok or not verdict.startswith("reconcile: drift=0 "):
        print(f"demo: MISMATCH {summary} rows={bad} side_outputs_ok={side_ok}")
        return 1
    print(f"demo: OK {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
