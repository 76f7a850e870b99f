"""What an emitter cycle with nothing to send costs as the outbox's history grows.

Two chDB stores: a fresh one, and one whose outbox holds `--history` pushes (default
5,000,000) already sent, spread over the last 30 days, made inside ClickHouse
(INSERT ... SELECT FROM numbers()); nothing is open. The real emitter (wired as `run`
wires it, against the bundled emulator) runs idle cycles on each; the figure is the ratio
of the median cycle times.
Run it with `python -m tests.bench.emitter_idle [--history N] [--aggregated]`; with
`--aggregated` the configuration also has an aggregated meter (its planning reads the
buckets named in planning_queue: none here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import stripe

from consumer.app import build_emitter
from consumer.clock import SystemClock
from consumer.config import Settings, load_settings
from consumer.local.emulator import EmulatorOptions, serve
from consumer.metrics import Metrics
from consumer.ops.meters_sync import apply, plan
from consumer.store import open_store
from consumer.store.backend import Backend
from consumer.store.migrations import migrate

KEY = "sk_test_bench"
CYCLES = 30
DAY_MS = 86_400_000


def settings_for(tmp: Path, url: str, aggregated: bool) -> Settings:
    meters: list[dict[str, Any]] = [
        {
            "name": "tokens",
            "event_name": "tokens",
            "stripe_event_name": "tokens",
            "emission": "per_event",
        }
    ]
    if aggregated:
        meters.append(
            {
                "name": "api_calls",
                "event_name": "api_calls",
                "stripe_event_name": "api_calls",
                "emission": "aggregated",
            }
        )
    return load_settings(
        clickhouse={"chdb_path": str(tmp / "chdb")},
        stripe={
            "api_key": KEY,
            "api_base": url,
            "meter_events_base": url,
            "poll_interval_seconds": 0.05,
            "error_report_interval_seconds": 3600,
        },
        meters=meters,
    )


def fill(store: Backend, n: int, now_ms: int) -> None:
    """`n` sent per-event pushes of 1,000 customers over the last 30 days."""
    store.command(
        f"""INSERT INTO stripe_pushes (identifier, mode, meter, stripe_event_name,
               customer_id, bucket_start, revision, value, status_rank, first_attempt_at,
               updated_at, stripe_timestamp, sent_value)
            SELECT concat('uc1e_', substring(lower(hex(SHA256(toString(number)))), 1, 40)),
                   'per_event', 'tokens', 'tokens', concat('cus_', toString(number % 1000)),
                   t, 0, 1, 6, t, t, t, 1
            FROM (SELECT number,
                         fromUnixTimestamp64Milli(
                             toInt64({now_ms} - (number * 30 * {DAY_MS}) / {n}), 'UTC') AS t
                  FROM numbers({n}))"""
    )
    store.command("OPTIMIZE TABLE stripe_pushes FINAL")


def idle_cycles(tmp: Path, history: int, aggregated: bool) -> list[float]:
    emu = serve("127.0.0.1", 0, EmulatorOptions(seed=1))
    try:
        settings = settings_for(tmp, emu.url, aggregated)
        api = stripe.StripeClient(KEY, base_addresses={"api": emu.url})
        apply(api, plan(api, settings.meters, [""]), settings.meters)
        store = open_store(settings.clickhouse)
        migrate(store)
        if history:
            fill(store, history, int(time.time() * 1000))
        emitter = build_emitter(settings, store, SystemClock(), Metrics())
        try:
            for _ in range(3):  # warm-up: the meters check, first reads
                emitter.run_once()
            times = []
            for _ in range(CYCLES):
                t0 = time.perf_counter()
                work = emitter.run_once()
                times.append(time.perf_counter() - t0)
                assert work == 0, "the bench's cycles must have nothing to do"
            return times
        finally:
            emitter.close()
            store.close()
    finally:
        emu.stop()


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--history", type=int, default=5_000_000)
    args.add_argument("--aggregated", action="store_true")
    opts = args.parse_args()
    medians = {}
    for name, n in (("fresh", 0), ("history", opts.history)):
        tmp = Path(tempfile.mkdtemp(prefix="bench-idle-"))
        try:
            medians[name] = statistics.median(idle_cycles(tmp, n, opts.aggregated))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    ratio = medians["history"] / medians["fresh"]
    print(
        json.dumps(
            {
                "history_pushes": opts.history,
                "aggregated_meter": opts.aggregated,
                "fresh_median_s": round(medians["fresh"], 5),
                "history_median_s": round(medians["history"], 5),
                "ratio": round(ratio, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
