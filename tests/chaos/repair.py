"""The `repair` crash scenario: `replay` and `reconcile --repair` SIGKILLed at chosen points
and at random instants, re-run until they finish, and Stripe's totals compared with the
ledger's (the ground truth) at the end: lost=0 doubled=0.

The store is seeded through the sinks with seeded random usage of three meters (aggregated
sum, per-event sum, per-event last) and drained by the real emitter into the emulator while
it loses a share of the events it answers 200 for; then windows are written wrong, as a
faulty rollup would, and billed. Each command then runs as its own process on the embedded
store (`python -m tests.chaos.armed_ops`, with the hooks of `tests/support/armed.py`), and
after each the emitter delivers what it queued (`python -m tests.chaos.drain`, no lease:
the store's only emitter), itself SIGKILLed inside the replay's Stripe adjustments and
between a repair push's 2xx and its mark. The emulator keeps no summary lag, so
`--settle-seconds 0`.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from consumer.app import build_emitter
from consumer.classify.classifier import Accepted, Classified
from consumer.classify.snapshot import Snapshot
from consumer.clock import SystemClock
from consumer.config import Settings, load_settings
from consumer.decode.event import DecodedEvent
from consumer.emitter.loop import Emitter
from consumer.local.emulator import EmulatorServer
from consumer.metrics import Metrics
from consumer.records import Record
from consumer.sinks.ledger import RangeWrite, accepted_table, batch_id, cancels_of
from consumer.store import Backend, open_store
from consumer.store.migrations import migrate
from tests.chaos.harness import Outcome
from tests.integration.conftest import METERS, STRIPE_KEY, emulator_with_meters
from tests.support.writes import accepted_batch, recompute_windows, write_effects

REPLAY_POINTS = ("after_replay_job", "after_window_rows", "after_replay_windows")
REPAIR_POINTS = ("before_repair_pushes", "after_open_names", "after_repair_pushes")
# Where the emitter is killed while it delivers: the replay's corrections (Stripe
# adjustments), then the repair pushes (a 2xx not yet marked).
DRAIN_POINTS = ("after_adjustment_intent", "after_stripe_adjustment", "after_stripe_2xx")
GROUP, TOPIC = "chaos-repair", "chaos-repair.events"
MINUTE_MS = 60_000


def run_scenario(workdir: Path, seed: int, events: int = 1_500, random_kills: int = 2) -> Outcome:
    """Seed, break, then replay and repair under kills; the outcome against the truth."""
    began = time.monotonic()
    rng = random.Random(seed)
    root = workdir / f"repair-{seed}"
    root.mkdir(parents=True, exist_ok=True)
    emu = emulator_with_meters(seed)
    try:
        settings, config = _settings(emu, root)
        now_ms = int(time.time() * 1000)
        start = (now_ms - 3 * 3_600_000) // 3_600_000 * 3_600_000
        store = open_store(settings.clickhouse)
        try:
            migrate(store)
            _ingest(store, settings, _usage(rng, events, start), now_ms)
            emu.state.configure({"drop_rate": 0.1, "seed": seed})
            _drain(settings, store)
            emu.state.configure({"drop_rate": 0.0})
            truth = _truth(store)
        finally:
            store.close()

        def break_windows() -> None:  # a faulty rollup's windows, billed: work for the next replay
            with_store = open_store(settings.clickhouse)
            try:
                for c in ("c0", "c1", "c2"):
                    at = start + rng.randrange(120) * MINUTE_MS
                    _wrong_window(with_store, c, at, rng.randrange(50))
                _drain(settings, with_store)
            finally:
                with_store.close()

        lost_before = len(emu.state.snapshot()["dropped"])
        span = ["--from", str(start // 1000), "--to", str(now_ms // 1000 // 60 * 60)]
        replay = ["--config", str(config), "replay", *span]
        repair = [
            "--config", str(config), "reconcile", *span, "--settle-seconds", "0", "--repair",
        ]  # fmt: skip
        log: list[str] = []
        kills = _until_done(replay, REPLAY_POINTS, rng, random_kills, {0}, log, break_windows)
        kills += _drain_killed(config, DRAIN_POINTS[:2], log)  # corrections of the replay
        kills += _until_done(repair, REPAIR_POINTS, rng, random_kills, {0, 1}, log)
        kills += _drain_killed(config, DRAIN_POINTS[2:], log)  # the repair pushes
        check = _command(repair, {})  # once more: it must find nothing to send
        got = _stripe(emu)
    finally:
        emu.stop()
    lost, doubled, differences = _compare(truth, got)
    wrong = sum(1 for k, v in truth.items() if k[0] == "storage_gb" and got.get(k) != v)
    wrong += " queued=0 " not in check.stdout  # a second repair sends nothing
    return Outcome(
        "repair",
        kills,
        events,
        lost,
        doubled,
        wrong,
        True,
        True,
        time.monotonic() - began,
        notes=f"the emulator lost {lost_before} events; killed: {' '.join(log)}; then "
        + (check.stdout.strip().splitlines() or ["(no output)"])[-1],
        differences=differences,
    )


def _settings(emu: EmulatorServer, root: Path) -> tuple[Settings, Path]:
    doc: dict[str, Any] = {
        "kafka": {"group_id": GROUP, "topic": TOPIC},
        "clickhouse": {"chdb_path": str(root / "chdb")},
        "stripe": {
            "api_key": STRIPE_KEY,
            "api_base": emu.url,
            "meter_events_base": emu.url,
            "requests_per_second": 1000,
            "concurrency": 1,
            "poll_interval_seconds": 0.05,
            "error_report_interval_seconds": 0,
        },
        "meters": METERS,
    }
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(doc))
    return load_settings(**doc), config


Usage = tuple[str, str, str, int, str]  # meter, customer, event id, time ms, value


def _usage(rng: random.Random, n: int, start_ms: int) -> list[Usage]:
    meters = ("api_calls", "tokens", "storage_gb")
    out = []
    for i in range(n):
        meter = meters[i % 3]
        value = f"{rng.randrange(100)}.5" if meter == "storage_gb" else str(rng.randrange(1, 9))
        at = start_ms + rng.randrange(2 * 3_600_000)
        out.append((meter, f"c{rng.randrange(3)}", f"e{i}", at, value))
    return out


def _ingest(store: Backend, settings: Settings, usage: Sequence[Usage], now_ms: int) -> None:
    """One batch through the sinks, as the commit stage writes it, and its windows."""
    by_name = {m.name: m for m in settings.meters}
    rows = [
        Accepted(
            Record(TOPIC, 0, i, None, b"", t),
            DecodedEvent(e, by_name[m].event_name, c, Decimal(v), t, {}, 4),
            by_name[m],
        )
        for i, (m, c, e, t, v) in enumerate(usage)
    ]
    ranges = [
        RangeWrite(
            TOPIC,
            0,
            0,
            len(rows),
            1,
            Snapshot({}, "chaos", now_ms),
            Classified(accepted=accepted_batch(rows)),
        )
    ]
    write_effects(store, batch_id(ranges), ranges, now_ms)
    recompute_windows(store, accepted_table(ranges), cancels_of(ranges))


def _wrong_window(store: Backend, customer: str, minute_ms: int, value: int) -> None:
    store.command(
        """INSERT INTO usage_windows
           SELECT 'api_calls', {c:String}, toDateTime({s:Int64}, 'UTC'), {v:Decimal(38, 9)}, 1,
                  {v:Decimal(38, 9)}, {v:Decimal(38, 9)}, {v:Decimal(38, 9)},
                  fromUnixTimestamp64Milli({ms:Int64}, 'UTC'), {v:Decimal(38, 9)},
                  fromUnixTimestamp64Milli({ms:Int64}, 'UTC'), now64(9, 'UTC')""",
        {"c": customer, "s": minute_ms // 1000, "ms": minute_ms, "v": str(value)},
    )
    store.command(
        """INSERT INTO planning_queue (meter, customer_id, window_start, version, planned)
           VALUES ('api_calls', {c:String}, toDateTime({s:Int64}, 'UTC'), now64(9, 'UTC'), 0)""",
        {"c": customer, "s": minute_ms // 1000},
    )


def _drain(settings: Settings, store: Backend) -> None:
    emitter: Emitter = build_emitter(settings, store, SystemClock(), Metrics())
    try:
        for _ in range(50):
            if emitter.run_once() == 0:
                return
        raise AssertionError("the emitter still had work after 50 cycles")
    finally:
        emitter.close()


def _command(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.chaos.armed_ops", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _until_done(
    args: list[str],
    points: Sequence[str],
    rng: random.Random,
    random_kills: int,
    ok: set[int],
    log: list[str],
    before: Callable[[], None] = lambda: None,
) -> int:
    """Run the command killed at each point, then at random instants, then to its end, each
    attempt after `before` (new work for it); returns the kills, and logs each. A kill
    leaves the store as a crash does (SIGKILL)."""
    kills = 0
    for point in points:
        before()
        done = _command(args, {"USAGE_CONSUMER_FAULT": f"{point}:1"})
        if done.returncode == -signal.SIGKILL:
            kills += 1
            log.append(f"{args[2]}@{point}")
        elif done.returncode not in ok:
            raise AssertionError(f"{args[2]} failed: {done.stderr[-2000:]}")
    for _ in range(random_kills):
        before()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.armed_ops", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        after = rng.uniform(0.3, 3.0)  # start-up is about 2 s: before, in, or after it
        time.sleep(after)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
            log.append(f"{args[2]}@{after:.2f}s")
        proc.wait()
    done = _command(args, {})
    if done.returncode not in ok:
        raise AssertionError(f"{args[2]} failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    return kills


def _drain_killed(config: Path, points: Sequence[str], log: list[str]) -> int:
    """The emitter killed at each point (when it gets there), then run until it is idle."""
    kills = 0
    for point in [*points, ""]:
        done = subprocess.run(
            [sys.executable, "-m", "tests.chaos.drain", str(config)],
            env={**os.environ, "USAGE_CONSUMER_FAULT": f"{point}:1" if point else ""},
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode == -signal.SIGKILL:
            kills += 1
            log.append(f"emitter@{point}")
        elif done.returncode != 0:
            raise AssertionError(f"the emitter failed: {done.stderr[-2000:]}")
    return kills


def _truth(store: Backend) -> dict[tuple[str, str], Decimal]:
    rows = store.query(
        """SELECT meter, customer_id, toString(sum(value)),
                  toString(argMax(value, (event_time, event_id)))
           FROM usage_events FINAL GROUP BY meter, customer_id"""
    )
    return {(str(m), str(c)): Decimal(last if m == "storage_gb" else s) for m, c, s, last in rows}


def _stripe(emu: EmulatorServer) -> dict[tuple[str, str], Decimal]:
    totals = emu.state.snapshot()["totals"]
    return {(t["event_name"], t["customer"]): Decimal(t["value"]) for t in totals}


def _compare(
    truth: dict[tuple[str, str], Decimal], got: dict[tuple[str, str], Decimal]
) -> tuple[Decimal, Decimal, str]:
    lost = doubled = Decimal(0)
    differs = []
    for key in sorted(truth.keys() | got.keys()):
        want, have = truth.get(key, Decimal(0)), got.get(key, Decimal(0))
        if want != have:
            differs.append(f"{key} truth={want} stripe={have}")
        if key[0] == "storage_gb":  # a last value: wrong, neither lost nor doubled
            continue
        lost += max(Decimal(0), want - have)
        doubled += max(Decimal(0), have - want)
    return lost, doubled, "; ".join(differs)
