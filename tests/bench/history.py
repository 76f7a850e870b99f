"""`make bench`, history: the consumer on a store aged like months of production, against a
fresh one, in the same run.

The aged store is generated inside ClickHouse (INSERT ... SELECT, not through Kafka):
BENCH_AGED_LEDGER (50,000,000) ledger rows over BENCH_AGED_DAYS (60) days of event time
ending where no read of the run reaches (the sample's four hours and the dedup horizon
before them, and an hour more: GAP_MS), their minute windows, the aggregated meter's buckets pushed
and sent, per-event pushes sent, BENCH_AGED_STATES (2,000,000) rows of ingest history and
corrections. Then, each in a process of its own: (c) the full pipeline on the fresh store
and on the aged one (same sample, own consumer groups; both must equal the ground truth),
and the emitter's cycle with nothing new to send on an empty store and on the aged one.
The ratios are `history.c_aged_over_fresh` and `history.emitter_cycle_aged_over_fresh`.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import stripe

from consumer.app import build_emitter
from consumer.clock import SystemClock
from consumer.config import load_settings
from consumer.metrics import Metrics
from consumer.ops.meters_sync import apply, plan
from consumer.store.chdb import ChdbBackend
from consumer.store.prepare import prepare_store

DAY_MS = 86_400_000
CHUNK = 10_000_000
AGED_PREFIX = "cus_aged_"  # the aged history's customers, apart from the sample's
# The history ends before the sample's span (4 h 10 min), the dedup horizon before it (6 h,
# read around every batch's event times) and an hour more: the ratio is of the months
# behind, not of a denser recent past, which costs the same on any store of that traffic.
GAP_MS = (4 * 60 + 10 + 6 * 60 + 60) * 60_000


def sizes() -> dict[str, int]:
    env = os.environ.get
    return {
        "ledger_rows": int(env("BENCH_AGED_LEDGER", 50_000_000)),
        "days": int(env("BENCH_AGED_DAYS", 60)),
        "states": int(env("BENCH_AGED_STATES", 2_000_000)),
        "customers": int(env("BENCH_CUSTOMERS", 10_000)),
    }


def age(workdir: str, topic: str) -> dict[str, Any]:
    """Fill the store at `workdir` with months of history; returns what it holds."""
    s = sizes()
    started = time.perf_counter()
    store = ChdbBackend(Path(workdir) / "chdb", "usage")
    try:
        prepare_store(store, load_settings().clickhouse)
        now = int(time.time() * 1000)
        end = now - GAP_MS
        start = end - s["days"] * DAY_MS
        rows, span = s["ledger_rows"], end - start
        for lo in range(0, rows, CHUNK):
            n = min(CHUNK, rows - lo)
            store.command(
                f"""INSERT INTO usage_events (meter, customer_id, event_id, event_time, value,
                        topic, partition, offset, record_time, ver)
                    SELECT ['api_calls', 'tokens', 'storage_gb'][n % 3 + 1] AS meter,
                           concat('{AGED_PREFIX}', toString(n % {s["customers"]})),
                           concat('aged-', toString(n)),
                           fromUnixTimestamp64Milli(toInt64({start} + intDiv(n * {span}, {rows})),
                                                    'UTC') AS t,
                           toDecimal128(1 + n % 9, 9), {topic!r}, toUInt32(n % 6),
                           intDiv(n, 6), t, 1
                    FROM (SELECT number + {lo} AS n FROM numbers({n}))"""
            )
            print(f"bench: aged ledger {lo + n:,} of {rows:,} rows", flush=True)
        for day in range(s["days"] + 1):  # windows a day at a time: bounded memory
            lo_ms, hi_ms = start + day * DAY_MS, start + (day + 1) * DAY_MS
            store.command(
                f"""INSERT INTO usage_windows
                    SELECT meter, customer_id, toDateTime(toStartOfMinute(event_time), 'UTC'),
                           sum(value), count(), min(value), max(value),
                           argMin(value, (event_time, event_id)), min(event_time),
                           argMax(value, (event_time, event_id)), max(event_time),
                           now64(9, 'UTC')
                    FROM usage_events
                    WHERE event_time >= fromUnixTimestamp64Milli({lo_ms}, 'UTC')
                      AND event_time < fromUnixTimestamp64Milli({hi_ms}, 'UTC')
                    GROUP BY meter, customer_id, toStartOfMinute(event_time)"""
            )
        # The aggregated meter's minute buckets, each pushed once and sent (the planner
        # finds nothing to add); the per-event meter's events, each pushed and sent.
        common = """status_rank, first_attempt_at, updated_at, stripe_timestamp, sent_value"""
        store.command(
            f"""INSERT INTO stripe_pushes (identifier, mode, meter, stripe_event_name,
                    customer_id, bucket_start, revision, value, bucket_end, {common})
                SELECT concat('aged-agg-', customer_id, '-', toString(window_start)),
                       'aggregated', meter, 'api_call', customer_id,
                       toDateTime64(window_start, 3, 'UTC') AS b, 1, sum_value,
                       b + INTERVAL 60 SECOND, 6, b, b, b, sum_value
                FROM usage_windows WHERE meter = 'api_calls'"""
        )
        store.command(
            f"""INSERT INTO stripe_pushes (identifier, mode, meter, stripe_event_name,
                    customer_id, bucket_start, revision, value, {common})
                SELECT concat('aged-pe-', event_id), 'per_event', meter, 'tokens',
                       customer_id, event_time, 0, value, 6, event_time, event_time,
                       event_time, value
                FROM usage_events WHERE meter = 'tokens'"""
        )
        store.command(
            f"""INSERT INTO ingest_state (group_id, topic, partition, range_start, range_end,
                    state_rank, epoch, attempt, snapshot, written_at)
                SELECT 'months-ago', {topic!r}, number % 6, intDiv(number, 12) * 500,
                       intDiv(number, 12) * 500 + 500, 1 + intDiv(number % 12, 6), 1, 1, '{{}}',
                       fromUnixTimestamp64Milli(toInt64({start} + intDiv(number * {span},
                                                {s["states"]})), 'UTC')
                FROM numbers({s["states"]})"""
        )
        store.command(
            """INSERT INTO cancellations (meter, customer_id, cancelled_id, event_id, event_time,
                    topic, partition, offset, record_time)
               SELECT meter, customer_id, event_id, concat('c-', event_id), event_time, topic,
                      partition, offset, record_time
               FROM usage_events WHERE meter = 'tokens' AND cityHash64(event_id) % 1000 = 0"""
        )
        store.command(
            """INSERT INTO stripe_corrections (meter, customer_id, bucket_start, cancelled_id,
                    mode, outcome, value, identifiers, reason, updated_at)
               SELECT meter, customer_id, event_time, cancelled_id, 'per_event', 'adjusted',
                      1, [concat('aged-pe-', cancelled_id)], '', event_time
               FROM cancellations"""
        )
        # Months-old parts are long merged: merged now, or the measured runs would share
        # the 2 cores with merges of the freshly inserted history.
        for table in ("usage_events", "usage_windows", "stripe_pushes", "ingest_state"):
            store.command(f"OPTIMIZE TABLE {table} FINAL")
        held = {
            t: int(store.query(f"SELECT count() FROM {t}")[0][0])
            for t in ("usage_events", "usage_windows", "stripe_pushes", "ingest_state",
                      "cancellations", "stripe_corrections")
        }  # fmt: skip
    finally:
        store.close()
    return {**s, "rows": held, "seconds": round(time.perf_counter() - started)}


CYCLES = 25  # an idle cycle takes about 20 ms: fewer samples left its median to the noise


def emitter_cycle(workdir: str, emulator_url: str) -> dict[str, Any]:
    """The emitter's cycle with nothing new to send (median of CYCLES, after it went idle),
    against the bundled emulator."""
    from tests.bench.pipeline import _peak_rss_mb

    settings = load_settings(
        clickhouse={"chdb_path": str(Path(workdir) / "chdb")},
        kafka={"control_topic": None},
        stripe={
            "api_key": "sk_test_history",
            "api_base": emulator_url,
            "meter_events_base": emulator_url,
            "requests_per_second": 100,
        },
    )
    api = stripe.StripeClient("sk_test_history", base_addresses={"api": emulator_url})
    apply(api, plan(api, settings.meters, [""]), settings.meters)
    store = ChdbBackend(Path(workdir) / "chdb", "usage")
    try:
        prepare_store(store, settings.clickhouse)
        emitter = build_emitter(settings, store, SystemClock(), Metrics())
        try:
            # Until idle: the first cycle after migration 21 plans the whole lookback once
            # (reported apart: a store migrated long ago never pays it again).
            t = time.perf_counter()
            for _ in range(50):
                if not emitter.run_once():
                    break
            else:
                raise RuntimeError("the emitter never went idle")
            until_idle = time.perf_counter() - t
            times = []
            for _ in range(CYCLES):
                t = time.perf_counter()
                work = emitter.run_once()
                times.append(time.perf_counter() - t)
                if work:
                    raise RuntimeError(f"an idle cycle found work: {work}")
        finally:
            emitter.close()
    finally:
        store.close()
    return {
        "cycle_ms": round(statistics.median(times) * 1000, 1),
        "cycles_ms": [round(x * 1000, 1) for x in times],
        "until_idle_ms": round(until_idle * 1000, 1),
        "peak_rss_mb": round(_peak_rss_mb()),
    }
