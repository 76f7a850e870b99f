"""`make bench`: what the consumer costs against the raw Kafka ceiling, on the same data in
one run.

One seeded sample (consumer/local/sample.py: duplicates, late, future, invalid and undecodable
messages about 1% each, with ground truth) is produced once into a Tansu topic; then each
phase reads all of it in a process of its own, so each has its own peak RSS and the
embedded store its own process:

  a  raw       confluent-kafka consuming with the pipeline's client settings and batch
               size, no processing; read first and again after (c), the faster counts
  b  decode    (a) plus fastavro decoding every message (the reference decoder), and (a)
               plus the consumer's decode stage (the C batch decoder, validation included)
  c  pipeline  the full pipeline into chDB: exactly-once ranges, dedup, windows (Stripe off)

Events/s is measured from a phase's first message to its last, so connecting and joining
the group are left out; the pipeline's run ends only once every offset is visible:
committed (its writes durable) and its minute windows recomputed. Phase (c) must end with
ClickHouse equal to the ground truth, or the run fails. Figures are ratios measured side
by side here: no timing is asserted anywhere in `make test`.

Sizes come from the environment: BENCH_EVENTS (1,000,000), BENCH_CUSTOMERS (10,000),
BENCH_PARTITIONS (6). Writes tests/bench/results.json and its chart.
"""

from __future__ import annotations

import functools
import importlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from consumer.app import build_decoder, build_pipeline
from consumer.clock import SystemClock
from consumer.config import SchemaConfig, Settings, load_settings
from consumer.decode.columns import RangeDecoder
from consumer.decode.event import DecodeError
from consumer.decode.validate import Limits
from consumer.ingest.kafka import consumer_config
from consumer.local.broker import TansuBroker
from consumer.local.demo import produce_messages
from consumer.local.sample import generate
from consumer.metrics import Metrics
from consumer.ops.health import Health
from consumer.ops.progress import Progress
from consumer.ops.totals import clickhouse_totals
from consumer.producer import UsageProducer
from consumer.records import RangeInput
from consumer.store import open_store
from consumer.store.backend import Backend
from tests.bench import history, replicas, stripe_rate

SEED = 11
TOPIC = "usage.events"
LATENCY_TOPIC = "usage.latency"
STRIPE_RATE = 100.0  # requests/s the emitter runs (d) and (e) at
OUT = Path(__file__).with_name("results.json")


def _env(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _peak_rss_mb() -> float:
    """This process's peak RSS. Not getrusage: Linux carries the parent's peak over exec,
    so a spawned child would report the parent's (which holds the whole sample)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def consume(bootstrap: str, partitions: int, total: int, decode: str) -> dict[str, Any]:
    """Phases (a) and (b): read every message of the topic once with the pipeline's own
    client settings; `decode` is "" (raw), "fastavro" (the reference decoder, one message
    at a time) or "batch" (the consumer's decode stage: a partition's batch at once)."""
    kafka = settings_for(bootstrap, Path(tempfile.gettempdir())).kafka
    conf = consumer_config(kafka)
    conf["group.id"] = f"bench-raw-{os.getpid()}"
    consumer = Consumer(conf)
    consumer.assign([TopicPartition(TOPIC, p, OFFSET_BEGINNING) for p in range(partitions)])
    settings = Settings()
    decoder = build_decoder(SchemaConfig())
    ranges = RangeDecoder(decoder, settings.meter_for_event(), Limits())
    seen = rejected = 0
    deadline = time.monotonic() + 600
    started = time.perf_counter()  # before the first poll: its fetch counts
    while seen < total and time.monotonic() < deadline:
        batch = consumer.consume(settings.pipeline.batch_max_messages, 1.0)
        for msg in batch:
            if msg.error() is not None:
                raise RuntimeError(f"consume failed: {msg.error()}")
        if decode == "fastavro":
            for msg in batch:
                try:
                    decoder.decode(msg.value())
                except DecodeError:
                    rejected += 1
        elif decode == "batch":
            by_partition: dict[int, list[Any]] = {}
            for msg in batch:
                by_partition.setdefault(msg.partition() or 0, []).append(msg)
            for p, msgs in by_partition.items():
                events = ranges.decode(RangeInput.of_messages(TOPIC, p, msgs))
                rejected += sum(r in _UNDECODABLE for r, _ in events.dead.values())
        seen += len(batch)
    seconds = time.perf_counter() - started
    consumer.close()
    if seen < total:
        raise RuntimeError(f"read {seen} of {total} messages in 10 minutes")
    return {
        "events": seen,
        "seconds": round(seconds, 3),
        "events_per_s": round(seen / seconds),
        "peak_rss_mb": round(_peak_rss_mb()),
        "undecodable": rejected if decode else None,
    }


# Dead-letter reasons of messages that do not decode (the rest are validation failures,
# which the batch decoder also finds and fastavro alone does not).
_UNDECODABLE = {
    "empty",
    "bad_magic",
    "truncated_header",
    "unknown_schema_id",
    "avro_decode_error",
    "trailing_bytes",
    "wrong_type",
    "missing_field",
}


def reported(run: dict[str, Any]) -> dict[str, Any]:
    """A run as results.json shows it: what it returns for checking (its totals and the
    requests it needs) stays with the run."""
    return {k: v for k, v in run.items() if k not in ("totals", "requests")}


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of runs of one phase, with every run's rate and the highest peak RSS
    (what a run returns for checking, its totals and requests, stays with the run)."""
    best = reported(max(runs, key=lambda r: int(r["events_per_s"])))
    best["runs_events_per_s"] = [r["events_per_s"] for r in runs]
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return best


def settings_for(
    bootstrap: str, workdir: Path, topic: str = TOPIC, group: str = "usage-consumer"
) -> Settings:
    return load_settings(
        kafka={
            "bootstrap_servers": bootstrap,
            "topic": topic,
            "group_id": group,
            # Tansu lets a member join after about half the session timeout (ENVIRONMENT.md):
            # 3 s instead of 23 s of waiting before each pipeline phase reads anything.
            "consumer_librdkafka": {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"},
        },
        clickhouse={"chdb_path": str(workdir / "chdb")},
        stripe={"enabled": False},
        pipeline={"metrics_port": 0},
    )


def pipeline(bootstrap: str, ends: dict[int, int], workdir: str, group: str) -> dict[str, Any]:
    """Phase (c): the whole consumer, on a store and consumer group of its own, until every
    offset is visible (committed, and its windows recomputed); returns its rate and
    ClickHouse's totals (checked against ground truth by the parent)."""
    settings = settings_for(bootstrap, Path(workdir), group=group)
    clock = SystemClock()
    metrics = Metrics()
    run = build_pipeline(settings, clock, metrics, Health(clock))
    stop = threading.Event()
    worker = threading.Thread(target=run.run, args=(stop,), name="pipeline")
    total = sum(ends.values())
    bar = Progress("pipeline", total)
    done = 0
    deadline = time.monotonic() + 1800
    # From before the first poll (the group join and first fetch count, as (a) and (b)
    # count their first fetch) to the last offset visible.
    started = time.perf_counter()
    worker.start()
    try:
        while worker.is_alive() and done < total and time.monotonic() < deadline:
            done = sum(min(run.rollup.visible.get(p, 0), e) for p, e in ends.items())
            bar.update(done)
            time.sleep(0.05)
    finally:
        seconds = time.perf_counter() - started
        stop.set()
        worker.join()
    bar.done(done)
    if done < total:
        raise RuntimeError(f"the pipeline made {done} of {total} offsets visible")
    store = open_store(settings.clickhouse)
    try:
        totals = clickhouse_totals(store, settings.meters)
        requests = requests_needed(store)
    finally:
        store.close()
    return {
        "events": total,
        "seconds": round(seconds, 3),
        "events_per_s": round(total / seconds),
        "peak_rss_mb": round(_peak_rss_mb()),
        "totals": {f"{c}|{m}": str(v) for (c, m), v in totals.items()},
        "requests": requests,
    }


def requests_needed(store: Backend) -> dict[str, int]:
    """Stripe requests each way of sending needs for the usage the run accepted: naive (one
    request per event), per_event (100 events a request) and aggregated (one push per
    meter, customer and bucket with usage, 100 a request; at least that many, as a bucket
    still filling while the emitter runs is pushed again as a new revision)."""
    (events,) = store.query("SELECT count() FROM usage_events FINAL")[0]
    (minutes,) = store.query("SELECT count() FROM usage_windows FINAL WHERE event_count > 0")[0]
    (hours,) = store.query(
        """SELECT count() FROM (SELECT DISTINCT meter, customer_id, toStartOfHour(window_start)
           FROM usage_windows FINAL WHERE event_count > 0)"""
    )[0]
    return {
        "usage_events": int(events),
        "naive": int(events),
        "per_event": -(-int(events) // 100),
        "aggregated_1m_buckets": -(-int(minutes) // 100),
        "aggregated_1h_buckets": -(-int(hours) // 100),
    }


def latency(
    bootstrap: str, workdir: str, topic: str, rate: float, seconds: float
) -> dict[str, Any]:
    """Produce to visible: messages are produced at `rate` a second while the pipeline runs;
    a message is visible once its range is committed and its windows are recomputed (what an
    analyst's query sees). Returns p50 and p99 in ms."""
    settings = settings_for(bootstrap, Path(workdir), topic)
    n = int(rate * seconds)
    partitions = 6
    sample = generate(n, 1_000, partitions, int(time.time() * 1000), SEED + 1)
    clock = SystemClock()
    run = build_pipeline(settings, clock, Metrics(), Health(clock))
    stop = threading.Event()
    worker = threading.Thread(target=run.run, args=(stop,), name="pipeline")
    worker.start()
    sent_at: dict[tuple[int, int], float] = {}

    def delivered(err: object, msg: Any, *, at: float) -> None:
        if err is None:
            sent_at[(msg.partition(), msg.offset())] = at

    def produce() -> None:
        producer = UsageProducer({"bootstrap.servers": bootstrap, "linger.ms": 1}, topic)
        t0 = time.perf_counter()
        for i, m in enumerate(sample.messages):
            due = t0 + i / rate
            while (now := time.perf_counter()) < due:
                time.sleep(min(due - now, 0.002))
            at = time.perf_counter()
            producer.send_raw(
                m.key,
                m.value,
                partition=m.partition,
                on_delivery=functools.partial(delivered, at=at),
            )
        producer.flush(60)

    while not run.ingestor.tracks:  # assigned: the group is joined
        time.sleep(0.05)
    producer = threading.Thread(target=produce, name="producer")
    producer.start()
    visible: dict[tuple[int, int], float] = {}
    seen = dict.fromkeys(range(partitions), 0)
    deadline = time.monotonic() + seconds * 5 + 120
    while len(visible) < len(sample.messages) and time.monotonic() < deadline:
        now = time.perf_counter()
        for p, committed in list(run.rollup.visible.items()):
            for offset in range(seen.get(p, 0), committed):
                visible[(p, offset)] = now
            seen[p] = max(seen.get(p, 0), committed)
        time.sleep(0.005)
    producer.join()
    stop.set()
    worker.join()
    waits = sorted((visible[k] - t) * 1000 for k, t in sent_at.items() if k in visible)
    if len(waits) < len(sample.messages):
        raise RuntimeError(f"{len(waits)} of {len(sample.messages)} messages became visible")
    return {
        "rate_per_s": rate,
        "messages": len(waits),
        "p50_ms": round(waits[len(waits) // 2]),
        "p99_ms": round(waits[int(len(waits) * 0.99)]),
        "peak_rss_mb": round(_peak_rss_mb()),
    }


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def in_child(target: Any, *args: Any) -> dict[str, Any]:
    """Run a phase in a fresh process (spawned: no Kafka client or store is inherited)."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        result: dict[str, Any] = pool.apply(target, args)
    return result


def cpu_probe_ms() -> float:
    """A fixed pure-Python loop (best of three): this machine's speed at the time, so runs
    on one shared host can be compared (it varied threefold within a day here)."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        x = 0
        for i in range(5_000_000):
            x += i
        best = min(best, time.perf_counter() - t)
    return round(best * 1000, 1)


def main() -> int:
    probe_before = cpu_probe_ms()
    events = _env("BENCH_EVENTS", 1_000_000)
    customers = _env("BENCH_CUSTOMERS", 10_000)
    partitions = _env("BENCH_PARTITIONS", 6)
    workdir = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        with TansuBroker() as broker:
            topics = {TOPIC: partitions, LATENCY_TOPIC: 6, "usage.dlq": 1, "usage.late": 1}
            broker.create_topics(topics)
            t = time.perf_counter()
            sample = generate(events, customers, partitions, int(time.time() * 1000), SEED)
            print(f"bench: generated {len(sample.messages):,} messages in "
                  f"{time.perf_counter() - t:.0f} s")  # fmt: skip
            ends = produce_messages(
                sample.messages, broker.bootstrap, TOPIC, Progress("produce", len(sample.messages))
            )
            total = sum(ends.values())
            first = in_child(consume, broker.bootstrap, partitions, total, "")
            print(f"bench: (a) raw consume     {first['events_per_s']:>9,} events/s")
            dec = in_child(consume, broker.bootstrap, partitions, total, "fastavro")
            print(f"bench: (b) consume+decode  {dec['events_per_s']:>9,} events/s (fastavro)")
            fast = in_child(consume, broker.bootstrap, partitions, total, "batch")
            print(f"bench: (b) consume+decode  {fast['events_per_s']:>9,} events/s (batch)")
            full_runs = [in_child(pipeline, broker.bootstrap, ends, str(workdir / "c1"), "c1")]
            print(f"bench: (c) full pipeline   {full_runs[0]['events_per_s']:>9,} events/s")
            # (a) again, the broker now settled after the produce: the faster read is the
            # ceiling the ratios divide by.
            again = in_child(consume, broker.bootstrap, partitions, total, "")
            print(f"bench: (a) raw consume     {again['events_per_s']:>9,} events/s (again)")
            raw = best_of([first, again])
            # (c) again on a fresh store and group: on a shared host one run can lose a third
            # to a neighbour; the faster is reported, and both must equal the ground truth.
            full_runs.append(in_child(pipeline, broker.bootstrap, ends, str(workdir / "c2"), "c2"))
            print(f"bench: (c) full pipeline   {full_runs[1]['events_per_s']:>9,} events/s (again)")
            full = best_of(full_runs[:2])
            pace = round(full["events_per_s"] / 2, -2)  # half the capacity: no backlog
            lat = in_child(latency, broker.bootstrap, str(workdir / "lat"), LATENCY_TOPIC, pace, 20)
            print(f"bench: (c) produce to visible at {pace:,.0f}/s: p50 {lat['p50_ms']} ms, "
                  f"p99 {lat['p99_ms']} ms")  # fmt: skip
            aged = workdir / "aged"
            built = in_child(history.age, str(aged), TOPIC)
            print(f"bench: aged store built in {built['seconds']} s: {built['rows']}")
            emu = stripe_rate.Emulator()
            try:
                cycle_fresh = in_child(history.emitter_cycle, str(workdir / "emit"), emu.url)
                cycle_aged = in_child(history.emitter_cycle, str(aged), emu.url)
            finally:
                emu.stop()
            print(f"bench: idle emitter cycle {cycle_fresh['cycle_ms']} ms fresh, "
                  f"{cycle_aged['cycle_ms']} ms aged")  # fmt: skip
            # Twice, as (c) fresh: on the aged store and on a copy of it made before the
            # first run wrote to it; the faster is reported, and both must equal the truth.
            shutil.copytree(aged, workdir / "aged-copy", symlinks=True)  # chDB links relatively
            aged_runs = []
            for store_dir, group in ((aged, "c-aged"), (workdir / "aged-copy", "c-aged-copy")):
                aged_runs.append(in_child(pipeline, broker.bootstrap, ends, str(store_dir), group))
                print(f"bench: (c) on the aged store {aged_runs[-1]['events_per_s']:>9,} events/s")
            c_aged = best_of(aged_runs)
            full_runs += aged_runs
            scaled = replicas.compare(broker.bootstrap, TOPIC, ends, workdir)
            full_runs += [scaled["one_process"], scaled["two_processes"]]  # exact as well
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stripe = {
        "d_per_event": in_child(stripe_rate.measure, STRIPE_RATE, 16, "per_event"),
        "d_aggregated": in_child(stripe_rate.measure, STRIPE_RATE, 16, "aggregated"),
        "e_naive": in_child(stripe_rate.measure, STRIPE_RATE, 16, "per_event", 1),
    }
    for name, r in stripe.items():
        print(f"bench: {name:13} {r['achieved_rps']:7.1f} of {STRIPE_RATE:.0f} requests/s "
              f"({r['ratio']:.3f})")  # fmt: skip
    exact = all(  # the aged store's own history (history.py) aside
        replicas.equals_truth(
            {k: v for k, v in r["totals"].items() if not k.startswith(history.AGED_PREFIX)},
            sample.truth,
        )
        for r in full_runs
    )
    requests = full_runs[0]["requests"]
    ratios = {
        "c_over_a": round(full["events_per_s"] / raw["events_per_s"], 3),
        "c_over_b": round(full["events_per_s"] / dec["events_per_s"], 3),
        "c_over_b_batch": round(full["events_per_s"] / fast["events_per_s"], 3),
        "b_over_a": round(dec["events_per_s"] / raw["events_per_s"], 3),
        "b_batch_over_a": round(fast["events_per_s"] / raw["events_per_s"], 3),
        "d_per_event_over_configured": stripe["d_per_event"]["ratio"],
        "d_aggregated_over_configured": stripe["d_aggregated"]["ratio"],
        "e_over_d_requests_per_event": round(requests["naive"] / requests["per_event"], 1),
        "e_over_d_requests_aggregated_1m": round(
            requests["naive"] / requests["aggregated_1m_buckets"], 1
        ),
        "e_over_d_requests_aggregated_1h": round(
            requests["naive"] / requests["aggregated_1h_buckets"], 1
        ),
    }
    history_results = {
        "aged": built,
        "c_fresh": full,
        "c_aged": c_aged,
        "c_aged_over_fresh": round(c_aged["events_per_s"] / full["events_per_s"], 3),
        "emitter_cycle_fresh": cycle_fresh,
        "emitter_cycle_aged": cycle_aged,
        "emitter_cycle_aged_over_fresh": round(
            cycle_aged["cycle_ms"] / max(cycle_fresh["cycle_ms"], 0.1), 3
        ),
    }
    print(f"bench: history: c aged/fresh {history_results['c_aged_over_fresh']}, idle emitter "
          f"cycle aged/fresh {history_results['emitter_cycle_aged_over_fresh']}")  # fmt: skip
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "cpu_probe_ms": {"before": probe_before, "after": cpu_probe_ms()},
        },
        "data": {
            "messages": total,
            "customers": customers,
            "partitions": partitions,
            "meters": sample.meters,
            "kinds": dict(sample.kinds),
        },
        "phases": {
            "a_raw": raw,
            "b_decode": dec,
            "b_decode_batch": fast,
            "c_pipeline": full,
            "c_latency": lat,
        },
        "stripe": {**stripe, "requests_for_the_run": requests},
        "ratios": ratios,
        "history": history_results,
        "replicas": {
            "two_over_one": scaled["two_over_one"],
            "one_process": reported(scaled["one_process"]),
            "two_processes": reported(scaled["two_processes"]),
            "bound": replicas.BOUND,
        },
        "clickhouse_equals_ground_truth": exact,
    }
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    chart(results, OUT.with_suffix(".png"))
    print("bench: " + "  ".join(f"{k} {v}" for k, v in ratios.items()))
    print(f"bench: ClickHouse equals ground truth: {exact}; written to {OUT} and its chart")
    return 0 if exact else 1


def chart(results: dict[str, Any], path: Path) -> None:
    """Events/s of (a), (b), (c) against the targets; Stripe requests per usage event."""
    # typed Any: matplotlib is an optional extra (`make bench` installs it), not in `make test`
    importlib.import_module("matplotlib").use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    phases = results["phases"]
    names = ["(a) raw consume", "(b) + fastavro", "(b) + batch decode", "(c) full pipeline"]
    keys_ = ("a_raw", "b_decode", "b_decode_batch", "c_pipeline")
    rates = [phases[k]["events_per_s"] for k in keys_]
    req = results["stripe"]["requests_for_the_run"]
    kinds = ["(e) naive", "(d) per_event", "(d) aggregated 1m", "(d) aggregated 1h"]
    keys = ("naive", "per_event", "aggregated_1m_buckets", "aggregated_1h_buckets")
    per_event = [req[k] / req["usage_events"] for k in keys]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.barh(names[::-1], rates[::-1], color=["#c44e52", "#dd8452", "#8172b2", "#4c72b0"])
    left.axvline(150_000, color="black", linestyle="--", label="target (c): 150k/s")
    left.axvline(0.6 * rates[1], color="grey", linestyle=":", label="target (c): 60% of (b)")
    ticker = importlib.import_module("matplotlib.ticker")
    left.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
    left.set_xlabel("events/s")
    left.legend(loc="lower right", fontsize=8)
    left.set_title(f"{results['data']['messages']:,} messages, {results['machine']['cpus']} cores")
    right.barh(kinds[::-1], per_event[::-1], color="#55a868")
    right.set_xscale("log")
    right.set_xlabel("Stripe requests per usage event (log)")
    right.set_title("requests for the same usage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
