"""Delivery truth: the real emitter against the bundled Stripe emulator, with time moved by
hand. Each test owns an emulator (its clock is jumped) and a chDB store; ground truth is
the usage seeded into the outbox and the minute windows.

- a 2xx whose mark was lost, then 25 hours (Stripe has forgotten the identifier): checked
  against event summaries, never billed twice; what did not land is sent exactly once;
  a minute the summary cannot settle is held, not guessed
- asynchronous rejections after a 200 are marked rejected with their reason
- a 36-day backlog is held as expired (default) or re-dated (explicit policy)
- while marks cannot be written, nothing more is sent
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import stripe

from consumer.app import build_emitter
from consumer.clock import ManualClock
from consumer.config import Settings, load_settings
from consumer.emitter.loop import Emitter, MarksBlocked
from consumer.emitter.plan import outbox
from consumer.emitter.plan.identifiers import per_event_identifier
from consumer.emitter.plan.outbox import PENDING, SENT, Push
from consumer.emitter.send.sender import SendFailed
from consumer.emitter.truth import standing
from consumer.emitter.truth.delivery import DAY_MS, HOUR_MS, MINUTE_MS
from consumer.local.emulator import EmulatorOptions, EmulatorServer, serve
from consumer.metrics import Metrics
from consumer.records import DECIMAL, TIME_MS
from consumer.sinks.rollup import Rollup, WindowJob
from consumer.store import open_store
from consumer.store.backend import Backend, StoreError, StoreUnavailable
from consumer.store.migrations import migrate
from tests.integration.conftest import METERS, STRIPE_KEY
from tests.integration.store_wrap import Passthrough
from tests.support.faulty_store import FaultyBackend

pytestmark = pytest.mark.integration

DAY_S = 86400.0
Truth = dict[tuple[str, str], Decimal]  # (Stripe event name, customer) -> value


@pytest.fixture
def server() -> Iterator[EmulatorServer]:
    """An emulator of this test's own: its clock is moved, so it is not shared."""
    emu = serve("127.0.0.1", 0, EmulatorOptions(seed=5))
    client = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": emu.url})
    for m in METERS:
        formula = "last" if m["aggregation"] == "last" else "sum"
        client.v1.billing.meters.create(
            {
                "display_name": str(m["name"]),
                "event_name": str(m["stripe_event_name"]),
                "default_aggregation": {"formula": formula},
            }
        )
    yield emu
    emu.stop()


class MarkFailingStore(Passthrough):
    """The real store, except that while `failing` is set a write of delivered marks
    (only status SENT into stripe_pushes) raises, as ClickHouse failing right after a 2xx."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.failing = False
        self.refused = 0

    def insert_columns(self, table: str, columns: Mapping[str, pa.Array], token: str = "") -> None:
        marks = table == "stripe_pushes" and set(columns["status_rank"].to_pylist()) == {SENT}
        if self.failing and marks:
            self.refused += 1
            raise StoreUnavailable("injected: the mark write failed")
        self.inner.insert_columns(table, columns, token)


@dataclass
class Rig:
    """One store and one emulator; emitters come and go as processes would."""

    server: EmulatorServer
    store: MarkFailingStore
    clock: ManualClock
    settings: Settings
    metrics: Metrics

    def emitter(self, **stripe_overrides: Any) -> Emitter:
        """A fresh emitter (a restarted process: nothing kept in memory), wired as `run`
        wires it."""
        settings = self.settings
        if stripe_overrides:
            settings = settings.model_copy(
                update={"stripe": settings.stripe.model_copy(update=stripe_overrides)}
            )
        self.metrics = Metrics()
        return build_emitter(settings, self.store, self.clock, self.metrics)

    def now_ms(self) -> int:
        return int(self.clock.now() * 1000)

    def control(self, path: str, **body: object) -> dict[str, Any]:
        req = urllib.request.Request(
            f"{self.server.url}/_emulator/{path}",
            method="POST",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
        return answer

    def jump(self, seconds: float) -> None:
        """Move Stripe's clock (its control endpoint) and ours by the same amount."""
        self.control("clock", advance_seconds=seconds)
        self.clock.jump(seconds)

    def snapshot(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.server.url}/_emulator/state", timeout=5) as resp:
            state: dict[str, Any] = json.loads(resp.read())
        return state

    def billed(self) -> Truth:
        return {
            (t["event_name"], t["customer"]): Decimal(t["value"]) for t in self.snapshot()["totals"]
        }

    def stored_per_identifier(self) -> Counter[str]:
        return Counter(e.identifier for e in self.server.state.stored_events())

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    def statuses(self) -> dict[str, tuple[str, str, int]]:
        """identifier -> (status, reason, Stripe timestamp in ms)."""
        rows = self.store.query(
            """SELECT identifier, status, reason, toUnixTimestamp64Milli(stripe_timestamp)
               FROM stripe_delivery"""
        )
        return {str(i): (str(s), str(r), int(t)) for i, s, r, t in rows}


def open_rig(server: EmulatorServer, tmp_path: Path, meters: list[dict[str, Any]]) -> Rig:
    """A rig on its own store (close `rig.store` when done)."""
    settings = load_settings(
        clickhouse={"chdb_path": str(tmp_path / "chdb")},
        stripe={
            "api_key": STRIPE_KEY,
            "api_base": server.url,
            "meter_events_base": server.url,
            "requests_per_second": 1000,
            "concurrency": 2,
            "max_retries": 0,
            "poll_interval_seconds": 0.05,
            "error_report_interval_seconds": 0,
        },
        meters=meters,
    )
    inner = open_store(settings.clickhouse)
    migrate(inner)
    return Rig(server, MarkFailingStore(inner), ManualClock(time.time()), settings, Metrics())


@pytest.fixture
def rig(server: EmulatorServer, tmp_path: Path) -> Iterator[Rig]:
    # exact decimals: these tests are about delivery; whole numbers are test_stripe_values
    r = open_rig(server, tmp_path, [{**m, "stripe_value_format": "decimal"} for m in METERS])
    try:
        yield r
    finally:
        r.store.close()


def per_event(
    rig: Rig, truth: Truth, name: str, customer: str, event_id: str, value: str, at_ms: int
) -> Push:
    """A per-event intent as the sink writes it (never attempted), counted in `truth`."""
    meter = {"tokens": "tokens", "storage_gb": "storage_gb"}[name]
    p = Push(
        per_event_identifier(name, event_id),
        "per_event",
        meter,
        name,
        customer,
        at_ms,
        0,
        Decimal(value),
        0,
    )
    outbox.write(rig.store, [p], PENDING, rig.now_ms())
    key = (name, customer)
    truth[key] = value_of(name, truth.get(key), Decimal(value))
    return p


def value_of(name: str, old: Decimal | None, new: Decimal) -> Decimal:
    return new if name == "storage_gb" else (old or Decimal(0)) + new


def insert_window(store: Backend, customer: str, minute_ms: int, value: Decimal) -> None:
    """One minute window of the aggregated meter (api_calls), as the sink writes it."""
    store.insert_columns(
        "usage_windows",
        {
            "meter": pa.array(["api_calls"]),
            "customer_id": pa.array([customer]),
            "window_start": pa.array([minute_ms // 1000], pa.timestamp("s", tz="UTC")),
            "sum_value": pa.array([value], DECIMAL),
            "event_count": pa.array([1], pa.uint64()),
            "min_value": pa.array([value], DECIMAL),
            "max_value": pa.array([value], DECIMAL),
            "first_value": pa.array([value], DECIMAL),
            "first_time": pa.array([minute_ms], TIME_MS),
            "last_value": pa.array([value], DECIMAL),
            "last_time": pa.array([minute_ms], TIME_MS),
            "computed_at": pa.array([minute_ms], TIME_MS),
        },
    )
    store.command(  # and named for the planner, as the rollup names what it recomputed
        """INSERT INTO planning_queue (meter, customer_id, window_start, version, planned)
           VALUES ('api_calls', {c:String}, toDateTime({s:Int64}, 'UTC'), now64(9, 'UTC'), 0)""",
        {"c": customer, "s": minute_ms // 1000},
    )


def window(rig: Rig, truth: Truth, customer: str, minute_ms: int, value: str) -> None:
    """A minute window of the aggregated meter (api_calls); the planner makes its intent."""
    insert_window(rig.store, customer, minute_ms, Decimal(value))
    key = ("api_calls", customer)
    truth[key] = truth.get(key, Decimal(0)) + Decimal(value)


def minute(ms: int) -> int:
    return ms // MINUTE_MS * MINUTE_MS


def drain(emitter: Emitter, cycles: int = 25) -> None:
    """Run cycles until one finds nothing to do."""
    for _ in range(cycles):
        if emitter.run_once() == 0:
            return
    raise AssertionError(f"the emitter still had work after {cycles} cycles")


def dies_in_one_cycle(rig: Rig, error: type[Exception], switch: str = "failing") -> None:
    """One emitter cycle with the store's failure `switch` on, ending in `error`; then the
    process is gone."""
    emitter = rig.emitter()
    setattr(rig.store, switch, True)
    try:
        with pytest.raises(error):
            emitter.run_once()
    finally:
        emitter.close()
        setattr(rig.store, switch, False)


def lost_marks(rig: Rig) -> None:
    """One cycle whose 2xx answers cannot be marked, then the process is gone."""
    dies_in_one_cycle(rig, MarksBlocked)


def seed_mixed(rig: Rig) -> Truth:
    """Aggregated windows and per-event usage; several pushes share minutes."""
    truth: Truth = {}
    base = minute(rig.now_ms() - 2 * HOUR_MS)
    for c in ("cus_a", "cus_b"):
        window(rig, truth, c, base, "7.5")
        window(rig, truth, c, base + MINUTE_MS, "3")
    for n, value in enumerate(("1", "2", "4", "8.25")):
        per_event(rig, truth, "tokens", "cus_a", f"ev{n}", value, base + 1000 * n)
    per_event(rig, truth, "tokens", "cus_b", "evb", "5", base + 5 * MINUTE_MS)
    per_event(rig, truth, "storage_gb", "cus_a", "g1", "42", base + 7 * MINUTE_MS)
    return truth


# -- (a) an unknown outcome, 25 hours later --------------------------------------------------


def test_lost_mark_then_25_hours_is_confirmed_by_summaries_not_billed_twice(rig: Rig) -> None:
    truth = seed_mixed(rig)
    lost_marks(rig)
    assert rig.billed() == truth  # everything landed once; nothing is marked
    assert rig.store.refused >= 1
    sent_before = rig.snapshot()["requests"]["stream"]

    rig.jump(25 * 3600)
    assert rig.snapshot()["identifiers_remembered"] == 0  # a blind re-send would now bill twice
    emitter = rig.emitter()
    drain(emitter)
    emitter.close()

    assert rig.billed() == truth
    assert set(rig.stored_per_identifier().values()) == {1}
    assert rig.snapshot()["requests"]["stream"] == sent_before  # checked, not re-sent
    statuses = rig.statuses()
    assert {s for s, _, _ in statuses.values()} == {"sent"}
    assert {r for _, r, _ in statuses.values()} == {"confirmed by event summary"}
    landed = rig.metric("usage_consumer_stripe_verifications_total", outcome="landed")
    assert landed == len(statuses)


def test_a_send_that_did_not_land_is_sent_again_exactly_once(rig: Rig) -> None:
    truth = seed_mixed(rig)
    rig.control("config", drop_rate=0.5)  # answered 200, then lost: Stripe never held them
    lost_marks(rig)
    rig.control("config", drop_rate=0.0)
    landed_first = set(rig.stored_per_identifier())
    every = set(rig.statuses())
    lost = every - landed_first
    assert landed_first and lost, "the seed must lose some events and keep others"
    assert rig.billed() != truth

    rig.jump(25 * 3600)
    emitter = rig.emitter()
    drain(emitter)
    emitter.close()

    assert rig.billed() == truth
    stored = rig.stored_per_identifier()
    assert set(stored) == every
    assert set(stored.values()) == {1}  # the lost ones once, the landed ones not again
    statuses = rig.statuses()
    assert {i for i, (_, r, _) in statuses.items() if r == "confirmed by event summary"} == (
        landed_first
    )
    assert {s for s, _, _ in statuses.values()} == {"sent"}
    assert rig.metric("usage_consumer_stripe_verifications_total", outcome="absent") == len(lost)


def test_a_minute_the_summary_cannot_settle_is_held_not_resent(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    truth: Truth = {}
    at = minute(rig.now_ms() - HOUR_MS)
    first = per_event(rig, truth, "tokens", "cus_h", "h1", "3", at)
    lost_marks(rig)  # h1 landed, unmarked
    second = per_event(rig, truth, "tokens", "cus_h", "h2", "3", at + 10)
    rig.control("config", rate_5xx=1.0)  # h2 attempted, never landed
    emitter = rig.emitter()
    with pytest.raises(SendFailed):
        emitter.run_once()
    emitter.close()
    rig.control("config", rate_5xx=0.0)
    assert rig.stored_per_identifier() == Counter({first.identifier: 1})

    rig.jump(25 * 3600)
    accepted = rig.snapshot()["events_accepted"]
    emitter = rig.emitter()
    with caplog.at_level(logging.ERROR, logger="consumer.emitter.loop"):
        drain(emitter)
    emitter.close()

    # One of two equal pushes landed; which one, no summary can say: neither is re-sent.
    assert rig.snapshot()["events_accepted"] == accepted
    assert rig.billed() == {("tokens", "cus_h"): Decimal(3)}
    assert truth == {("tokens", "cus_h"): Decimal(6)}
    statuses = rig.statuses()
    assert statuses[first.identifier][0] == statuses[second.identifier][0] == "pending"
    assert rig.metric("usage_consumer_stripe_pushes_held", status="unverifiable") == 2
    assert "held 2 Stripe pushes of tokens for cus_h" in caplog.text


# -- (b) a 2xx is not billing -----------------------------------------------------------------


def test_rejections_reported_after_200_are_marked_rejected_with_the_reason(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.control("config", unknown_customers="cus_gone")
    truth: Truth = {}
    base = minute(rig.now_ms() - 3 * HOUR_MS)
    for c in ("cus_ok", "cus_gone"):
        window(rig, truth, c, base, "10")
        per_event(rig, truth, "tokens", c, f"{c}-1", "2.5", base + 1)
    too_precise = per_event(rig, truth, "tokens", "cus_ok", "precise", "12345678901.234567", base)
    emitter = rig.emitter()
    with caplog.at_level(logging.ERROR, logger="consumer.emitter.loop"):
        drain(emitter)
        drain(emitter)  # the planner must not plan the rejected usage again
    emitter.close()

    rejected = {i: r for i, (s, r, _) in rig.statuses().items() if s == "rejected"}
    gone = {p.identifier for p in standing.undelivered(rig.store) if p.customer_id == "cus_gone"}
    assert len(gone) == 2 and gone <= set(rejected)
    assert all(rejected[i].startswith("meter_event_customer_not_found:") for i in gone)
    # 17 significant digits go as two events Stripe accepts, never as one it would refuse
    assert rig.statuses()[too_precise.identifier][0] == "sent"
    assert len(rejected) == 2
    count = "usage_consumer_stripe_events_rejected_total"
    assert rig.metric(count, code="meter_event_customer_not_found") == 2
    assert rig.metric(count, code="meter_event_value_too_many_digits") == 0
    assert rig.metric("usage_consumer_stripe_pushes_held", status="rejected") == 2
    assert "Stripe rejected 2 meter events after a 2xx" in caplog.text

    # Billed + rejected = ground truth, and "sent" in the outbox is exactly what was billed.
    by_status = standing.status_totals(rig.store)
    meter_of = {"api_calls": "api_calls", "tokens": "tokens"}
    billed = rig.billed()
    for (name, customer), value in truth.items():
        held = by_status.get((customer, meter_of[name], "rejected"), Decimal(0))
        assert billed.get((name, customer), Decimal(0)) + held == value
        assert by_status.get((customer, meter_of[name], "sent"), Decimal(0)) == billed.get(
            (name, customer), Decimal(0)
        )
    assert len([p for p in rig.statuses() if p.startswith("uc1a_")]) == 2  # no re-plan


# -- (c) a 36-day backlog -----------------------------------------------------------------------


def seed_backlog(rig: Rig) -> tuple[Truth, set[str], set[str]]:
    """Usage 36 days old (past Stripe's limit), 31 days old (near it) and an hour old."""
    truth: Truth = {}
    now = rig.now_ms()
    old = {
        per_event(rig, truth, "tokens", "cus_old", f"o{n}", "4", now - 36 * DAY_MS + n).identifier
        for n in range(3)
    }
    planned = Push("uc1a_old", "aggregated", "api_calls", "api_calls", "cus_old",
                   minute(now - 36 * DAY_MS), 1, Decimal("6"), 0)  # fmt: skip
    outbox.write(rig.store, [planned], PENDING, now)
    truth[("api_calls", "cus_old")] = Decimal(6)
    old.add(planned.identifier)
    near = {per_event(rig, truth, "tokens", "cus_near", "n1", "5", now - 31 * DAY_MS).identifier}
    per_event(rig, truth, "tokens", "cus_new", "f1", "1", now - HOUR_MS)
    return truth, old, near


def test_backlog_past_35_days_is_held_as_expired_and_alerts(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    truth, old, near = seed_backlog(rig)
    rig.control("config", rate_5xx=1.0)  # Stripe is down: the backlog waits, and alerts
    emitter = rig.emitter()
    logs = caplog.at_level(logging.ERROR, logger="consumer.emitter.loop")
    with logs, pytest.raises(SendFailed):
        emitter.run_once()
    assert rig.metric("usage_consumer_stripe_pushes_near_limit") == len(near)
    assert rig.metric("usage_consumer_stripe_pending_oldest_age_seconds") > 30 * DAY_S
    assert "pending Stripe pushes are older than 30 days" in caplog.text
    assert "past Stripe's 35-day timestamp limit and were NOT billed" in caplog.text
    rig.control("config", rate_5xx=0.0)
    drain(emitter)
    emitter.close()

    statuses = rig.statuses()
    assert {i for i, (s, _, _) in statuses.items() if s == "expired"} == old
    assert all(statuses[i][1].startswith("past Stripe's 35-day limit") for i in old)
    assert all(statuses[i][0] == "sent" for i in near)
    assert rig.metric("usage_consumer_stripe_pushes_held", status="expired") == len(old)
    assert rig.metric("usage_consumer_stripe_pushes_near_limit") == 0
    held = {p.identifier for p in standing.undelivered(rig.store)}
    assert held == old
    state = rig.snapshot()
    assert state["events_rejected_async"] == 0  # nothing was sent for Stripe to refuse
    expected = {k: v for k, v in truth.items() if k[1] != "cus_old"}
    assert rig.billed() == expected


def test_redate_policy_bills_past_limit_usage_at_the_oldest_accepted_time(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    truth, old, _ = seed_backlog(rig)
    held = rig.emitter()  # the default policy holds first ...
    drain(held)
    held.close()
    assert {i for i, (s, _, _) in rig.statuses().items() if s == "expired"} == old

    emitter = rig.emitter(past_limit_policy="redate")  # ... an explicit policy re-dates
    with caplog.at_level(logging.WARNING, logger="consumer.emitter.loop"):
        drain(emitter)
    emitter.close()

    assert rig.billed() == truth
    assert rig.snapshot()["events_rejected_async"] == 0
    limit = rig.now_ms() - 35 * DAY_MS + HOUR_MS
    redated = rig.store.query(
        """SELECT identifier, toUnixTimestamp64Milli(stripe_timestamp), reason FROM stripe_delivery
           WHERE redated AND status = 'sent'"""
    )
    assert {str(i) for i, _, _ in redated} == old
    for _, ts, reason in redated:
        assert limit <= int(ts) < limit + MINUTE_MS and int(ts) % MINUTE_MS == 0
        assert str(reason).startswith("redated from ")
    stamps = {e.identifier: e.timestamp for e in rig.server.state.stored_events()}
    assert all(stamps[i] * 1000 >= limit for i in old)
    assert rig.metric("usage_consumer_stripe_pushes_past_limit_total", action="redated") == 4
    assert "re-dated to" in caplog.text


# -- (d) marks failing --------------------------------------------------------------------------


def test_no_sends_while_marks_cannot_be_written(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    truth: Truth = {}
    settings = {"concurrency": 1, "max_events_per_request": 5}
    emitter = rig.emitter(**settings)
    assert emitter.run_once() == 0
    assert rig.metric("usage_consumer_stripe_outbox_idle") == 1  # nothing to do yet
    base = minute(rig.now_ms() - HOUR_MS)
    for n in range(40):
        per_event(rig, truth, "tokens", f"cus_{n % 4}", f"m{n}", str(n + 1), base + n)
    rig.control(
        "config", latency_seconds=0.05
    )  # requests outlast a mark write, even on a busy host
    rig.store.failing = True
    with caplog.at_level(logging.ERROR, logger="consumer.emitter.loop"):
        with pytest.raises(MarksBlocked):
            emitter.run_once()
        first = rig.snapshot()["requests"]["stream"]
        assert 1 <= first <= 3  # the request whose mark failed, and any already in flight
        for _ in range(3):
            with pytest.raises(MarksBlocked):
                emitter.run_once()
    assert rig.snapshot()["requests"]["stream"] == first  # not one more while marks fail
    assert rig.metric("usage_consumer_stripe_sends_paused") == 1
    assert rig.metric("usage_consumer_stripe_mark_failures_total") == 4
    # Failing cycles are not idle: a drain check must not stop the process on a stale 1.
    assert rig.metric("usage_consumer_stripe_outbox_idle") == 0
    assert "sending paused until a mark succeeds" in caplog.text

    # ClickHouse failing outright: the cycle stops before anything is sent.
    down = build_emitter(rig.settings, FaultyBackend(rig.store, 1.0, 0.0, 1), rig.clock, Metrics())
    with pytest.raises(StoreError):
        down.run_once()
    down.close()
    assert rig.snapshot()["requests"]["stream"] == first

    rig.store.failing = False
    drain(emitter)
    emitter.close()
    assert rig.metric("usage_consumer_stripe_sends_paused") == 0
    assert rig.billed() == truth
    state = rig.snapshot()
    assert state["duplicates"] == 0  # what was delivered before the pause was not sent again
    assert state["requests"]["stream"] == 8
    assert {s for s, _, _ in rig.statuses().values()} == {"sent"}


class AfterTake(Passthrough):
    """The real store; `hook` runs once right after a cycle has taken the planning queue."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.hook: Callable[[], None] | None = None

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Any]:
        rows = self.inner.query(sql, params)
        if self.hook is not None and "FROM planning_queue FINAL WHERE planned = 0" in sql:
            hook, self.hook = self.hook, None
            hook()
        return rows


def test_the_outbox_is_not_idle_while_windows_it_plans_from_are_behind(rig: Rig) -> None:
    """Drain checks read the idle gauge, so it is 1 only after a cycle that began with every
    window job of this process finished and saw none queued while it ran. A partition
    assigned to a fresh process queues the jobs a killed one left pending; an emitter that
    had taken the lease first found nothing to plan. Its 1 must not survive that: once seen,
    a drain check stopped the process before the recovered windows were ever planned."""
    store = AfterTake(rig.store)
    rollup = Rollup(store.inner, "g", "usage.events", rig.clock, rig.metrics, horizon_ms=HOUR_MS)
    emitter = build_emitter(rig.settings, store, rig.clock, rig.metrics, rollup)
    minute_s = minute(rig.now_ms() - HOUR_MS) // 1000
    windows = pa.table(
        {
            "meter": pa.array(["tokens"], pa.string()),
            "customer_id": pa.array(["cus_recovered"], pa.string()),
            "window_start": pa.array([minute_s], pa.timestamp("s", tz="UTC")),
        }
    )
    job = WindowJob("left-pending", (), (("tokens", minute_s),), windows, ())

    def unplanned() -> int:
        rows = store.query("SELECT count() FROM planning_queue FINAL WHERE planned = 0")
        return int(rows[0][0])

    try:
        assert emitter.run_once() == 0  # nothing in the store to plan or send
        assert rig.metric("usage_consumer_stripe_outbox_idle") == 1
        # A job queued between two cycles: the stale 1 goes at once, with no cycle run.
        rollup.submit(job)
        assert rig.metric("usage_consumer_stripe_outbox_idle") == 0
        rollup.wait()
        assert emitter.run_once() == 0 and unplanned() == 0  # the name is taken: planned
        assert rig.metric("usage_consumer_stripe_outbox_idle") == 1

        # A job queued and finished while a cycle ran, after it took the names: that cycle
        # planned without the job's windows, so it is not idle; the next one plans them.
        def queued_meanwhile() -> None:
            rollup.submit(job)
            rollup.wait()

        store.hook = queued_meanwhile
        assert emitter.run_once() == 0
        assert rollup.submitted == 2 and unplanned() == 1
        assert rig.metric("usage_consumer_stripe_outbox_idle") == 0
        assert not emitter.drained_since(2)
        assert emitter.run_once() == 0 and unplanned() == 0
        assert rig.metric("usage_consumer_stripe_outbox_idle") == 1
        assert emitter.drained_since(3)
    finally:
        rollup.close()
        emitter.close()
