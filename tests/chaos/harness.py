"""The crash harness: kill `usage-consumer run` anywhere, fault its dependencies, restart it
until the data is drained, and compare ground truth, ClickHouse and Stripe per customer,
meter and hour. Seeded and reproducible; every scenario gets its own broker, emulator,
topic and store.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import stripe
from confluent_kafka import Consumer, TopicPartition

from consumer.config import default_meters
from consumer.local.broker import TansuBroker, free_port
from consumer.local.demo import produce_messages
from consumer.local.emulator import EmulatorOptions, EmulatorServer, serve
from consumer.local.sample import METERS, Message, Sample, generate
from consumer.producer import UsageProducer
from consumer.store.chdb import ChdbBackend
from consumer.store.migrations import migrate
from tests.chaos.netns import Link, Unavailable, open_link
from tests.chaos.registry import Registry
from tests.support.clickhouse_http import Endpoint, running
from tests.support.redrives import copy_ends

# Every table write of a range, the emitter's request/mark boundary, and a session refresh.
POINTS = (
    "after_intent",
    "before_side_output_flush",
    "after_write_usage_events",
    "after_write_stripe_pushes",
    "after_write_dead_letters",
    "after_insert",
    "after_window_job",
    "after_done",
    "stripe_mid_batch",
    "after_stripe_2xx",
    "after_adjustment_intent",
    "after_stripe_adjustment",
    "session_refresh",
)
# Where `dlq redrive` stops for good: its record of a chunk, the chunk's copies produced
# and confirmed, the copies' offsets recorded.
REDRIVE_POINTS = ("redrive_after_intent", "redrive_after_produce", "redrive_after_record")
KEY = "sk_test_chaos"
MAX_POLL_MS = 6000  # a zombie is stopped past this and the session timeout (3 s)
FAULT_SECONDS = 8.0  # how long a zombie stays stopped, a partition cut
POISON = b"chaos-poison-pill"
Key = tuple[str, str, int]  # (customer, meter, hour start in epoch seconds)


@dataclass(frozen=True)
class Scenario:
    name: str
    events: int = 15_000
    kill_points: tuple[str, ...] = ()  # "point" (its 1st-3rd occurrence) or "point:n"
    random_kills: int = 0
    emulator: dict[str, Any] = field(default_factory=dict)
    store_faults: str = ""
    pause_broker_seconds: float = 0.0
    expire_sessions_every: float = 0.0
    partitions: int = 3
    customers: int = 20
    waves: int = 0  # data waves, each produced before a start; 0 = one per start
    kill_at: int = 0  # which occurrence of a kill point kills; 0 = seeded 1-3
    env: dict[str, str] = field(default_factory=dict)  # consumer environment overrides
    store_setup: tuple[str, ...] = ()  # SQL on the migrated store before the first start
    between_kills: tuple[str, ...] = ()  # SQL on the store after each kill, before a restart
    poison: int = 0  # messages that crash the consumer whenever they are classified (P7)
    registry_outage: float = 0.0  # serve schemas from a registry, down for this long per start
    clock_skews: tuple[float, ...] = ()  # each start's wall-clock skew, in turn (clock jumps)
    instances: int = 1  # consumer instances in the process, sharing its store (and group)
    restamped: float = 0.0  # share of events with a re-stamped copy in the next partition
    # consumer processes running at once, each with its own ledger lock, on one store they
    # share through the ClickHouse HTTP endpoint over chDB (tests/support/clickhouse_http.py)
    processes: int = 1
    trickle: bool = False  # produce each wave while the consumer runs, not before it starts
    # With several processes, each cycle does one of (chosen by the seed, each at least
    # once): SIGKILL a random process, SIGKILL the emitter's (the lease holder), SIGTERM one
    # (a clean leave), SIGSTOP one past its session and max.poll.interval.ms and resume it
    # (a zombie), or cut the replica in a network namespace off from the broker, the store
    # and Stripe, and heal it (netns.py; skipped with the reason where it cannot run).
    replica_faults: bool = False
    # A meter left out of the configuration while the data is consumed (its events become
    # dead letters), then configured and `dlq redrive` run: killed at each kill point and at
    # random, the consumer run and killed between, until a run completes.
    redrive: str = ""


@dataclass
class Outcome:
    scenario: str
    kills: int
    events: int
    lost: Decimal
    doubled: Decimal
    wrong: int
    side_ok: bool
    drained: bool
    seconds: float
    missed: str = ""  # a dependency fault the scenario asked for never hit the consumer
    notes: str = ""  # what the run did, or could not do here (printed, not a failure)
    differences: str = ""  # where the totals differ from the truth: source, key, truth, got

    @property
    def ok(self) -> bool:
        return (
            self.drained
            and self.side_ok
            and not self.lost
            and not self.doubled
            and not self.wrong
            and not self.missed
        )

    def line(self) -> str:
        return (
            f"{self.scenario:<20} kills={self.kills:<4} events={self.events:<7} "
            f"lost={self.lost} doubled={self.doubled} wrong={self.wrong} "
            f"dead_letters_ok={self.side_ok} drained={self.drained} "
            f"{self.seconds:.0f}s {'OK' if self.ok else 'FAIL'}"
            + (f" missed: {self.missed}" if self.missed else "")
            + (f"\n    {self.notes}" if self.notes else "")
            + (f"\n    differs: {self.differences}" if self.differences else "")
        )


class Harness:
    def __init__(self, workdir: Path, seed: int, log: Callable[[str], None] = print) -> None:
        self.workdir = workdir
        self.seed = seed
        self.rng = random.Random(seed)
        self.log = log

    def run(self, sc: Scenario) -> Outcome:
        started = time.monotonic()
        home = self.workdir / sc.name
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        with ExitStack() as stack:
            link, unlinked = None, ""
            if sc.replica_faults:
                try:
                    link = stack.enter_context(open_link())
                except Unavailable as exc:
                    unlinked = f"no network partition here: {exc}"
            host = link.host if link else "127.0.0.1"  # where the dependencies listen
            broker = stack.enter_context(TansuBroker(host=host))
            emu = stack.enter_context(_emulator(self.seed, host))
            topic = f"{sc.name}.events"
            broker.create_topics({topic: sc.partitions, f"{sc.name}.dlq": 1, f"{sc.name}.late": 1})
            sample = generate(
                sc.events,
                sc.customers,
                sc.partitions,
                int(time.time() * 1000),
                self.seed,
                customer_prefix=f"cus_{sc.name}_",
                cancels=True,
                restamped=sc.restamped,
            )
            _post(emu.url, "/_emulator/config", sc.emulator)
            add_poison(sample, sc.poison, sc.partitions)
            if sc.store_setup:
                store_sql(home, sc.store_setup)
            with ExitStack() as served:
                endpoint = None
                if sc.processes > 1:  # migrated first, as a deployment's migration job does
                    store_sql(home, ())
                    endpoint = served.enter_context(running(home / "chdb", host=host))
                run = _Run(sc, home, broker, emu, sample, self.rng, endpoint, link)
                with run.dependency_faults():
                    if sc.redrive:
                        kills = run.redrive_cycles()
                    elif sc.processes == 1:
                        kills = run.kill_cycles()
                    else:
                        kills = run.kill_processes()
                    drained = run.drain(300 + 60 * sc.poison)  # each poison costs restarts
                    kills += run.crashes
            # the endpoint is stopped: the store is read directly from here on
            # Cancels taken back too late (a skewed clock can make them so) are billed on
            # purpose, recorded and surfaced: Stripe should hold truth plus those.
            stripe = _stripe_hourly(emu.url)
            for key, value in _late_corrections_hourly(home).items():
                stripe[key] = stripe.get(key, Decimal(0)) - value
            clickhouse = _clickhouse_hourly(home)
            lost, doubled, wrong = compare(sample, clickhouse, stripe)
            differences = differ(sample, clickhouse=clickhouse, stripe=stripe)
            side = _redriven(home) if sc.redrive else _side_outputs(home, sample, sc.poison)
        return Outcome(
            sc.name,
            kills,
            sc.events,
            lost,
            doubled,
            wrong,
            not side,
            drained,
            time.monotonic() - started,
            missed=run.missed(),
            differences=differences,
            notes="; ".join(x for x in (run.done(), unlinked, side) if x),
        )


@contextmanager
def _emulator(seed: int, host: str = "127.0.0.1") -> Iterator[EmulatorServer]:
    emu = serve(host, 0, EmulatorOptions(seed=seed))
    client = stripe.StripeClient(KEY, base_addresses={"api": emu.url})
    for _, (meter, agg, _share) in METERS.items():
        client.v1.billing.meters.create(
            {
                "display_name": meter,
                "event_name": meter,
                "default_aggregation": {"formula": "last" if agg == "last" else "sum"},
            }
        )
    try:
        yield emu
    finally:
        emu.stop()


@dataclass
class _Proc:
    """A running consumer process, its metrics port, and whether it is the namespace's."""

    proc: subprocess.Popen[bytes]
    port: int
    guest: bool = False
    host: str = "127.0.0.1"


LEASE = "usage_consumer_emitter_lease_held"
OWNED = "usage_consumer_partitions_owned"


class _Run:
    """One scenario's consumer processes: killed, restarted, finally drained."""

    def __init__(
        self,
        sc: Scenario,
        home: Path,
        broker: TansuBroker,
        emu: EmulatorServer,
        sample: Sample,
        rng: random.Random,
        endpoint: Endpoint | None = None,
        link: Link | None = None,
    ) -> None:
        self.sc, self.home, self.broker, self.emu, self.rng = sc, home, broker, emu, rng
        self.endpoint, self.link = endpoint, link
        self.faults: dict[str, int] = {}  # replica faults done, by kind
        self.producer: UsageProducer | None = None
        self.fired: dict[str, int] = {}  # kill point -> starts it killed at that point
        self.exited: list[int] = []  # exit codes of processes that stopped by themselves
        self.ends: dict[int, int] = {}
        self.crashes = 0  # processes that killed themselves while draining (poison)
        self.starts = 0
        self.registry = Registry() if sc.registry_outage else None
        # Data arrives in waves, one before each consumer start, so every kill finds work.
        n = sc.waves or len(sc.kill_points) + sc.random_kills + 1
        size = -(-len(sample.messages) // n)
        self.waves = [sample.messages[i : i + size] for i in range(0, len(sample.messages), size)]
        self.group = f"{sc.name}-group"
        self.log = open(home / "consumer.log", "a")  # noqa: SIM115 - closed in drain()
        self.meters: str | None = None  # a meters configuration (JSON) instead of the default

    def env(self, fault: str = "", guest: bool = False) -> tuple[dict[str, str], int]:
        port = free_port()
        sc = self.sc
        env = {
            **os.environ,
            "USAGE_CONSUMER_KAFKA__BOOTSTRAP_SERVERS": self.broker.bootstrap,
            "USAGE_CONSUMER_KAFKA__TOPIC": f"{sc.name}.events",
            "USAGE_CONSUMER_KAFKA__DLQ_TOPIC": f"{sc.name}.dlq",
            "USAGE_CONSUMER_KAFKA__LATE_TOPIC": f"{sc.name}.late",
            "USAGE_CONSUMER_KAFKA__GROUP_ID": self.group,
            "USAGE_CONSUMER_KAFKA__CONSUMER_LIBRDKAFKA": json.dumps(
                {
                    "session.timeout.ms": "3000",
                    "heartbeat.interval.ms": "500",
                    "max.poll.interval.ms": str(MAX_POLL_MS),
                }
            ),
            "USAGE_CONSUMER_CLICKHOUSE__CHDB_PATH": str(self.home / "chdb"),
            # kills are of processes, whose writes the page cache keeps: fsync costs time only
            "USAGE_CONSUMER_CLICKHOUSE__FSYNC_AFTER_INSERT": "false",
            "USAGE_CONSUMER_STRIPE__API_KEY": KEY,
            "USAGE_CONSUMER_STRIPE__API_BASE": self.emu.url,
            "USAGE_CONSUMER_STRIPE__METER_EVENTS_BASE": self.emu.url,
            "USAGE_CONSUMER_STRIPE__REQUESTS_PER_SECOND": "400",
            "USAGE_CONSUMER_STRIPE__SESSION_REFRESH_MARGIN_SECONDS": "1",
            "USAGE_CONSUMER_STRIPE__POLL_INTERVAL_SECONDS": "0.2",
            "USAGE_CONSUMER_PIPELINE__BATCH_MAX_MESSAGES": "1500",
            "USAGE_CONSUMER_PIPELINE__METRICS_HOST": self.metrics_host(guest),
            "USAGE_CONSUMER_PIPELINE__METRICS_PORT": str(port),
            "USAGE_CONSUMER_FAULT": fault,
            "USAGE_CONSUMER_STORE_FAULTS": sc.store_faults,
            "USAGE_CONSUMER_POISON": POISON.decode() if sc.poison else "",
            "USAGE_CONSUMER_CLOCK_SKEW_SECONDS": str(
                sc.clock_skews[self.starts % len(sc.clock_skews)] if sc.clock_skews else 0
            ),
            **sc.env,
        }
        if self.meters is not None:
            env["USAGE_CONSUMER_METERS"] = self.meters
        if self.endpoint is not None:
            env |= {
                "USAGE_CONSUMER_CLICKHOUSE__BACKEND": "server",
                "USAGE_CONSUMER_CLICKHOUSE__HOST": self.endpoint.host,
                "USAGE_CONSUMER_CLICKHOUSE__PORT": str(self.endpoint.port),
                "USAGE_CONSUMER_CLICKHOUSE__USERNAME": self.endpoint.user,
                "USAGE_CONSUMER_CLICKHOUSE__PASSWORD": self.endpoint.password,
                "USAGE_CONSUMER_CLICKHOUSE__DATABASE": "usage",
            }
        return env, port

    def metrics_host(self, guest: bool) -> str:
        """Where a process's /metrics listens: the namespace's address for the guest."""
        return self.link.guest if guest and self.link else "127.0.0.1"

    def start(self, fault: str = "", guest: bool = False) -> tuple[subprocess.Popen[bytes], int]:
        """A consumer process; `guest`: inside the network namespace (replica faults)."""
        env, port = self.env(fault, guest)
        self.starts += 1
        if self.registry is not None:
            env["USAGE_CONSUMER_SCHEMA__REGISTRY_URL"] = self.registry.url
            self.registry.outage(self.sc.registry_outage)  # every start meets one first
        self.log.write(f"--- start fault={fault or '-'}\n")
        self.log.flush()
        command = [sys.executable, "-m", "tests.support.armed"]
        if self.sc.instances > 1:
            command = [sys.executable, "-m", "tests.chaos.instances", str(self.sc.instances)]
        if guest and self.link is not None:
            command = [*self.link.prefix(), *command]
        proc = subprocess.Popen(command, env=env, stdout=self.log, stderr=self.log)
        return proc, port

    def kill_cycles(self) -> int:
        plan: list[str | None] = [*self.sc.kill_points, *[None] * self.sc.random_kills]
        kills = 0
        for point in plan:
            if not self.sc.trickle:
                self.produce_wave()
            fault = point or ""
            if point and ":" not in point:  # a point without its occurrence: 1st-3rd
                fault = f"{point}:{self.sc.kill_at or self.rng.randint(1, 3)}"
            proc, _ = self.start(fault)
            if self.sc.trickle:
                self.produce_wave(chunks=40)  # the consumer reads at the head, as in production
            try:
                if point:
                    proc.wait(timeout=25)  # the fault hook kills it at the point
                else:
                    proc.wait(timeout=self.rng.uniform(0.5, 6.0))
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += proc.returncode == -signal.SIGKILL
            if point:
                self.fired[point] = self.fired.get(point, 0) + self._fired(fault)
            if self.sc.between_kills:
                store_sql(self.home, self.sc.between_kills)
        return kills

    def redrive_cycles(self) -> int:
        """Scenario.redrive: every wave consumed with that meter left out (its events dead
        letters, reason unknown_meter); then, the meter configured, `dlq redrive` is
        killed at each kill point (its 1st-3rd occurrence: once per chunk of copies) and at
        random moments, the consumer runs a random while between (killed too, mid-way
        through the copies), until a redrive completes. The drain then counts the copies."""
        kept = [m for m in default_meters() if m.name != self.sc.redrive]
        self.meters = json.dumps([m.model_dump(mode="json") for m in kept])
        while self.waves:
            self.produce_wave()
        if not self._drained(120):
            raise RuntimeError("the first pass (the meter left out) did not drain")
        self.meters = None
        kills = 0
        plan: list[str | None] = [*self.sc.kill_points, *[None] * self.sc.random_kills]
        for point in plan:
            fault = f"{point}:{self.rng.randint(1, 3)}" if point else ""
            proc = self.start_redrive(fault)
            try:
                proc.wait(timeout=60 if point else self.rng.uniform(0.5, 3.0))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            kills += proc.returncode == -signal.SIGKILL
            if point:
                self.fired[point] = self.fired.get(point, 0) + self._fired(fault)
            consumer, _ = self.start()
            try:
                consumer.wait(timeout=self.rng.uniform(1.0, 6.0))
            except subprocess.TimeoutExpired:
                consumer.send_signal(signal.SIGKILL)
                consumer.wait()
            kills += consumer.returncode == -signal.SIGKILL
        last = self.start_redrive("")
        if last.wait(timeout=120) != 0:
            self.exited.append(last.returncode)
        for p, end in _copy_ends(self.home).items():
            self.ends[p] = max(self.ends.get(p, 0), end)
        return kills

    def start_redrive(self, fault: str) -> subprocess.Popen[bytes]:
        env, _ = self.env(fault)
        self.log.write(f"--- start redrive fault={fault or '-'}\n")
        self.log.flush()
        command = [sys.executable, "-m", "tests.support.armed", "dlq", "redrive"]
        command += ["--reason", "unknown_meter", "--batch-size", "100"]
        return subprocess.Popen(command, env=env, stdout=self.log, stderr=self.log)

    def _drained(self, timeout: float) -> bool:
        """Run one unfaulted process until everything produced is committed and the
        outbox is idle, then stop it cleanly."""
        proc, port = self.start()
        try:
            if self._wait_drained(proc, port, time.monotonic() + timeout):
                proc.send_signal(signal.SIGTERM)
                return proc.wait(timeout=60) == 0
            return False
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def kill_processes(self) -> int:
        """`processes` consumer processes at once: each cycle brings them back up to that
        many, lets them run, then SIGKILLs one of them, chosen by the seed; the others run
        on into the next cycle (so kills meet them anywhere in their work, and each
        survivor's group rebalances around the dead one). With `replica_faults` a cycle
        does one of the faults listed there instead. The last ones are killed too."""
        running: list[_Proc] = []
        kills = 0

        def stop(p: _Proc, sig: signal.Signals = signal.SIGKILL) -> int:
            if p.proc.poll() is None:
                p.proc.send_signal(sig)
            try:
                p.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # a clean leave that hangs is killed, and seen
                p.proc.kill()
                p.proc.wait()
            expected = {-signal.SIGKILL, *([0] if sig == signal.SIGTERM else [])}
            if p.proc.returncode not in expected:
                self.exited.append(p.proc.returncode)
            running.remove(p)
            return int(p.proc.returncode == -signal.SIGKILL)

        try:
            for fault in self._replica_plan():
                if not self.sc.trickle:
                    self.produce_wave()
                for gone in [p for p in running if p.proc.poll() is not None]:
                    stop(gone)  # it stopped by itself: recorded, and replaced
                while len(running) < self.sc.processes:
                    guest = self.link is not None and not any(p.guest for p in running)
                    proc, port = self.start(guest=guest)
                    running.append(_Proc(proc, port, guest, self.metrics_host(guest)))
                if self.sc.trickle:
                    self.produce_wave(chunks=40)
                time.sleep(self.rng.uniform(0.5, 6.0))
                kills += self._replica_fault(fault, running, stop)
        finally:
            for p in list(running):
                kills += stop(p)
        return kills

    def _replica_plan(self) -> list[str]:
        """Each cycle's fault, in a seeded order: with `replica_faults` every kind at least
        once, the emitter's kill about one cycle in four."""
        n = self.sc.random_kills
        if not self.sc.replica_faults:
            return ["kill"] * n
        kinds = ["kill-emitter", "leave", "zombie", *(["partition"] if self.link else [])]
        plan = kinds * max(1, n // 8) + ["kill-emitter"] * max(0, n // 8)
        plan += ["kill"] * max(0, n - len(plan))
        self.rng.shuffle(plan)
        return plan

    def _replica_fault(self, fault: str, running: list[_Proc], stop: Callable[..., int]) -> int:
        """Do `fault` to one of the running processes; returns the SIGKILLs it made."""
        pick = running[self.rng.randrange(len(running))]
        if fault == "kill-emitter":
            holders = [p for p in running if _metric(p.host, p.port, LEASE) == 1.0]
            if not holders:  # the lease is between holders: a random kill instead
                fault = "kill"
            pick = holders[0] if holders else pick
        self.faults[fault] = self.faults.get(fault, 0) + 1
        self.log.write(f"--- {fault} pid={pick.proc.pid}\n")
        self.log.flush()
        if fault == "leave":
            stop(pick, signal.SIGTERM)
            return 0
        if fault == "zombie":
            pick.proc.send_signal(signal.SIGSTOP)
            time.sleep(FAULT_SECONDS)  # its group moves on; its writes in flight stay
            pick.proc.send_signal(signal.SIGCONT)
            return 0
        if fault == "partition" and self.link is not None:
            self.link.cut()
            try:
                time.sleep(FAULT_SECONDS)
            finally:
                self.link.heal()
            return 0
        return stop(pick)

    def done(self) -> str:
        """The replica faults this run made, by kind; how many kill points fired."""
        parts = [f"{k}={v}" for k, v in sorted(self.faults.items())]
        if self.sc.kill_points:
            unfired = sorted(p for p in set(self.sc.kill_points) if not self.fired.get(p))
            parts.append(
                f"kill points fired {sum(self.fired.values())}/{len(self.sc.kill_points)}"
                + (f" (never: {', '.join(unfired)})" if unfired else "")
            )
        return ", ".join(parts)

    def _fired(self, fault: str) -> int:
        """1 when the last start killed itself at `fault` (tests/support/armed.py says so
        in the log), 0 when the harness's timeout killed it instead."""
        self.log.flush()
        tail = (self.home / "consumer.log").read_bytes()[-200_000:].decode(errors="replace")
        last = tail.rsplit("--- start", 1)[-1]
        point, _, n = fault.partition(":")
        return int(f"fault: SIGKILL at {point} #{n}" in last)

    def produce_wave(self, chunks: int = 1) -> None:
        """The next wave, at once or in `chunks` 150 ms apart (a trickle: about 6 s), through
        one producer for the run (an idempotent producer's start costs a round trip)."""
        if not self.waves:
            return
        if self.producer is None:
            self.producer = UsageProducer(
                {"bootstrap.servers": self.broker.bootstrap}, f"{self.sc.name}.events"
            )
        wave = self.waves.pop(0)
        size = -(-len(wave) // chunks)
        for i in range(0, len(wave), size):
            if i:
                time.sleep(0.15)
            ends = produce_messages(
                wave[i : i + size],
                self.broker.bootstrap,
                f"{self.sc.name}.events",
                producer=self.producer,
            )
            for p, end in ends.items():
                self.ends[p] = max(self.ends.get(p, 0), end)

    def drain(self, timeout: float = 300) -> bool:
        """Run unfaulted until every offset is committed and the outbox is idle."""
        while self.waves:
            self.produce_wave()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                proc, port = self.start()
                try:
                    if self._wait_drained(proc, port, deadline):
                        proc.send_signal(signal.SIGTERM)
                        proc.wait(timeout=60)
                        return proc.returncode == 0
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                self.crashes += proc.returncode == -signal.SIGKILL
                time.sleep(1)  # it crashed (e.g. ClickHouse failed at start): restart it
            return False
        finally:
            self.log.close()
            if self.registry is not None:
                self.registry.stop()

    def missed(self) -> str:
        if self.registry is not None and not self.registry.refused:
            return "the schema registry outage was never met"
        if self.exited:
            return f"processes stopped by themselves (exit codes {self.exited})"
        return ""

    def _wait_drained(self, proc: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
        """Every offset committed, every partition owned by this (the only) process, then
        three idle reads in a row. Owned first: window jobs a killed process left pending
        are queued when their partition is assigned, and an emitter that took the lease
        before that found nothing to plan (its idle gauge is reset when they are queued)."""
        idle_after_commit = 0
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            owned = _metric("127.0.0.1", port, OWNED)
            if not self.committed_all() or owned != self.sc.partitions:
                idle_after_commit = 0
                continue
            idle_after_commit = idle_after_commit + 1 if _idle(port) else 0
            if idle_after_commit >= 3:  # three consecutive idle reads after the last commit
                return True
        return False  # the process died (a real crash): the caller restarts it

    def committed_all(self) -> bool:
        c = Consumer({"bootstrap.servers": self.broker.bootstrap, "group.id": self.group})
        try:
            got = c.committed(
                [TopicPartition(f"{self.sc.name}.events", p) for p in self.ends], timeout=10
            )
        except Exception:
            return False
        finally:
            c.close()
        return all(tp.offset == self.ends[tp.partition] for tp in got)

    @contextmanager
    def dependency_faults(self) -> Iterator[None]:
        stop = threading.Event()
        threads = []
        if self.sc.expire_sessions_every:
            threads.append(threading.Thread(target=self._expire_sessions, args=(stop,)))
        if self.sc.pause_broker_seconds:
            threads.append(threading.Thread(target=self._pause_broker, args=(stop,)))
        for t in threads:
            t.start()
        try:
            yield
        finally:
            stop.set()
            for t in threads:
                t.join()

    def _expire_sessions(self, stop: threading.Event) -> None:
        while not stop.wait(self.sc.expire_sessions_every):
            _post(self.emu.url, "/_emulator/expire_sessions", {})

    def _pause_broker(self, stop: threading.Event) -> None:
        """SIGSTOP the broker longer than the consumer's session timeout, then resume."""
        while not stop.wait(self.rng.uniform(2, 5)):
            os.kill(self.broker.pid, signal.SIGSTOP)
            try:
                stop.wait(self.sc.pause_broker_seconds)
            finally:
                os.kill(self.broker.pid, signal.SIGCONT)
            stop.wait(10)


def _post(url: str, path: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=10).close()


def _idle(port: int) -> bool:
    return _metric("127.0.0.1", port, "usage_consumer_stripe_outbox_idle") == 1.0


def _metric(host: str, port: int, name: str) -> float | None:
    """One unlabelled metric of a consumer's /metrics; None when it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def add_poison(sample: Sample, n: int, partitions: int) -> None:
    """Spread `n` poison messages through the sample; they must end as dead letters."""
    step = max(1, len(sample.messages) // (n + 1))
    for i in range(n, 0, -1):
        value = b"\x00\x00\x00\x00\x02" + POISON + str(i).encode()
        sample.messages.insert(i * step, Message(None, value, i % partitions, "undecodable"))
    sample.kinds["undecodable"] += n


def store_sql(home: Path, statements: tuple[str, ...]) -> None:
    """Run statements on a scenario's store while no consumer holds it (migrated first)."""
    store = ChdbBackend(home / "chdb", "usage")
    try:
        migrate(store)
        for sql in statements:
            store.command(sql)
    finally:
        store.close()


def _copy_ends(home: Path) -> dict[int, int]:
    store = ChdbBackend(home / "chdb", "usage")
    try:
        return copy_ends(store)
    finally:
        store.close()


def _redriven(home: Path) -> str:
    """Every unknown_meter dead letter was re-driven (recorded as sent), and every copy that
    failed again (the meter's invalid events, now refused for their own reason; events
    naming no meter at all, still unknown_meter) is a dead letter naming one of them: what
    differs, or ""."""
    store = ChdbBackend(home / "chdb", "usage")
    try:
        link = "header_values[indexOf(header_keys, 'usage-consumer.redrive-of')]"
        unsent = store.query(
            """SELECT count() FROM dead_letters FINAL
               WHERE reason = 'unknown_meter' AND indexOf(header_keys,
                     'usage-consumer.redrive-of') = 0
                 AND (topic, partition, offset) NOT IN
                     (SELECT topic, partition, offset FROM dlq_redrives WHERE state = 2)"""
        )[0][0]
        copies = store.query(
            f"""SELECT count(), countIf(reason = 'unknown_meter'),
                       countIf({link} NOT IN (SELECT concat(topic, '/', toString(partition),
                               '/', toString(offset)) FROM dead_letters FINAL
                               WHERE reason = 'unknown_meter'))
                FROM dead_letters FINAL WHERE indexOf(header_keys,
                     'usage-consumer.redrive-of') > 0"""
        )[0]
    finally:
        store.close()
    failed, still_unknown, unlinked = (int(x) for x in copies)
    if int(unsent) or unlinked or not failed or still_unknown == failed:
        return (
            f"unknown_meter dead letters never re-driven: {unsent}; copies failed again: "
            f"{failed} ({still_unknown} still unknown_meter, {unlinked} naming no original)"
        )
    return ""


def _late_corrections_hourly(home: Path) -> dict[Key, Decimal]:
    """Cancelled usage recorded as too late to take back from Stripe, by hour."""
    store = ChdbBackend(home / "chdb", "usage")
    try:
        rows = store.query(
            """SELECT customer_id, meter, toUnixTimestamp(toStartOfHour(bucket_start)),
                      toString(sum(value))
               FROM stripe_corrections FINAL WHERE outcome = 'late' GROUP BY 1, 2, 3"""
        )
    finally:
        store.close()
    return {(str(c), str(m), int(h)): Decimal(v) for c, m, h, v in rows}


def _clickhouse_hourly(home: Path) -> dict[Key, Decimal]:
    store = ChdbBackend(home / "chdb", "usage")
    try:
        rows = store.query("""SELECT customer_id, meter, toUnixTimestamp(hour),
                                     toString(sum_value), toString(last_value)
                              FROM usage_hourly""")
    finally:
        store.close()
    aggs = {m: a for m, a, _ in METERS.values()}
    return {
        (str(c), str(m), int(h)): Decimal(s if aggs[str(m)] == "sum" else last)
        for c, m, h, s, last in rows
    }


def _stripe_hourly(url: str) -> dict[Key, Decimal]:
    with urllib.request.urlopen(f"{url}/_emulator/hourly", timeout=10) as r:
        rows = json.loads(r.read())["rows"]
    return {(x["customer"], x["event_name"], int(x["hour"])): Decimal(x["value"]) for x in rows}


def compare(sample: Sample, *observed: dict[Key, Decimal]) -> tuple[Decimal, Decimal, int]:
    """Units lost and billed twice (sum meters), and wrong `last` values, over all sources."""
    aggs = {m: a for m, a, _ in METERS.values()}
    lost, doubled, wrong = Decimal(0), Decimal(0), 0
    for got in observed:
        for key in set(sample.truth_hourly) | set(got):
            truth = sample.truth_hourly.get(key, Decimal(0))
            value = got.get(key, Decimal(0))
            if aggs[key[1]] == "last":
                wrong += value != truth
            elif value < truth:
                lost += truth - value
            else:
                doubled += value - truth
    return lost, doubled, wrong


def differ(sample: Sample, limit: int = 8, **observed: dict[Key, Decimal]) -> str:
    """The first keys whose totals differ from the truth, by source: what a failed
    comparison is explained from (the store's windows, or what Stripe holds, or both)."""
    out = []
    for source, got in observed.items():
        for key in sorted(set(sample.truth_hourly) | set(got)):
            truth = sample.truth_hourly.get(key, Decimal(0))
            if got.get(key, Decimal(0)) != truth:
                out.append(f"{source} {key} truth={truth} got={got.get(key, Decimal(0))}")
    return "; ".join(out[:limit]) + (f"; ... {len(out) - limit} more" if len(out) > limit else "")


def _side_outputs(home: Path, sample: Sample, poison: int) -> str:
    """Dead letters are exactly the invalid and undecodable messages produced, the poison
    ones quarantined as such; what differs, or "" when nothing does."""
    store = ChdbBackend(home / "chdb", "usage")
    try:
        rows = store.query("SELECT reason, count() FROM dead_letters FINAL GROUP BY 1")
        reasons: dict[str, int] = {str(r): int(n) for r, n in rows}
    finally:
        store.close()
    k = sample.kinds
    expected = k["invalid"] + k["future"] + k["undecodable"]
    dead = sum(reasons.values())
    poisoned = reasons.get("poison", 0)
    if dead == expected and poisoned == poison:
        return ""
    return (
        f"dead letters {dead} (expected {expected}), poison {poisoned} (expected {poison}); "
        f"by reason {dict(sorted(reasons.items()))}"
    )
