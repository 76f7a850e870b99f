"""Repair and replay against the real stand-ins (the emulator, chDB, the real emitter):

- `reconcile --repair`: the emulator loses a share of the events it answered 200 for; the
  repair queues exactly what each window lacks, the emitter delivers it, reconcile finds no
  drift and Stripe equals the truth; a second repair (before and after the delivery) sends
  nothing; a surplus past Stripe's 24 hours is reported for a person, never sent
- `replay`: windows a faulty rollup wrote wrong (and the emitter billed) are found by a dry
  run that changes nothing, rewritten by a replay, and reach Stripe through the planner and
  the corrections; a second replay changes nothing; a replay killed between its window rows
  and their names is finished by the next run
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import stripe
import yaml

from consumer import crash_points
from consumer.cli import main
from consumer.config import load_settings
from consumer.emitter.truth.delivery import HOUR_MS, MINUTE_MS, DeliveryPolicy
from consumer.emitter.truth.summaries import SummaryReader
from consumer.local.emulator import EmulatorServer
from consumer.ops import repair as repairing
from consumer.ops.reconcile import Report, reconcile
from consumer.ops.replay import Where, replay
from consumer.store.chdb import ChdbBackend
from consumer.store.migrations import migrate
from tests.integration.conftest import METERS, STRIPE_KEY
from tests.integration.test_corrections import ingest
from tests.integration.test_stripe_delivery import Rig, drain, minute, open_rig
from tests.integration.test_stripe_delivery import server as server  # a fixture

pytestmark = pytest.mark.integration
SETTLE_MS = 300_000
DROP_SEED = 23  # the emulator's losses are drawn from its seeded generator


@pytest.fixture
def rig(server: EmulatorServer, tmp_path: Path) -> Iterator[Rig]:
    r = open_rig(server, tmp_path, METERS)  # whole numbers for the sums, as by default
    try:
        yield r
    finally:
        r.store.close()


def run(rig: Rig) -> None:
    emitter = rig.emitter(concurrency=1)  # one request at a time: the losses replay
    try:
        drain(emitter)
    finally:
        emitter.close()


def reconciled(rig: Rig, start_ms: int) -> Report:
    api = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": rig.server.url})
    start = start_ms // 1000 // 3600 * 3600
    end = (rig.now_ms() - SETTLE_MS) // 1000 // 60 * 60
    return reconcile(rig.store, SummaryReader(api, lambda: None), rig.settings.meters, start, end)


def repair_now(rig: Rig, report: Report) -> tuple[list[repairing.Action], int]:
    now = rig.now_ms()
    oldest = DeliveryPolicy.from_config(rig.settings.stripe).limit_ms(now)
    limits = repairing.Limits(now, SETTLE_MS, oldest)
    return repairing.repair(rig.store, report, rig.settings.meters, limits)


def truth_of(rig: Rig) -> dict[tuple[str, str], Decimal]:
    """(Stripe event name, customer) -> the ledger's total (sum) or newest value (last)."""
    rows = rig.store.query(
        """SELECT meter, customer_id, toString(sum(value)),
                  toString(argMax(value, (event_time, event_id)))
           FROM usage_events FINAL GROUP BY meter, customer_id"""
    )
    return {(str(m), str(c)): Decimal(last if m == "storage_gb" else s) for m, c, s, last in rows}


def seed(rig: Rig, base: int) -> None:
    """Usage of three customers over 20 minutes of every meter, through the sink."""
    events: list[tuple[str, str, str, int, str]] = []
    for c in ("cus_a", "cus_b", "cus_c"):
        for i in range(20):
            at = base + i * MINUTE_MS + 7_000
            events.append(("api_calls", c, f"{c}-a{i}", at, str(1 + i % 4)))
            events.append(("tokens", c, f"{c}-t{i}", at, str(10 + i)))
            events.append(("storage_gb", c, f"{c}-g{i}", at, f"{i}.5"))
    ingest(rig, events)


def test_repair_queues_what_stripe_lost_once_and_reports_a_surplus(rig: Rig) -> None:
    base = minute(rig.now_ms() - 3 * HOUR_MS)
    seed(rig, base)
    rig.control("config", drop_rate=0.2, seed=DROP_SEED)
    run(rig)
    rig.control("config", drop_rate=0.0)
    lost = rig.snapshot()["dropped"]
    assert lost, f"the emulator lost nothing (seed {DROP_SEED}); the test needs losses"
    truth = truth_of(rig)
    assert rig.billed() != truth

    report = reconciled(rig, base)
    assert report.drifting  # Stripe holds less: negative drift
    rig.jump(SETTLE_MS / 1000 * 2)  # the marks are past the settle time: nothing settling
    actions, queued = repair_now(rig, reconciled(rig, base))
    kinds = {a.kind for a in actions}
    assert kinds == {repairing.SEND}, repairing.format_actions(actions)
    sums = [a for a in actions if a.line.meter != "storage_gb"]
    assert all(a.amount == -a.line.drift for a in sums)
    assert queued == sum(len(a.pushes) for a in actions)

    again, n = repair_now(rig, reconciled(rig, base))  # before the emitter ran: in flight
    assert n == 0 and {a.kind for a in again} == {repairing.IN_FLIGHT}

    run(rig)  # the emitter delivers the repair pushes (the lease holder's job)
    assert rig.billed() == truth
    rig.jump(SETTLE_MS / 1000 * 2)
    after = reconciled(rig, base)
    assert after.drifting == []
    assert sum((x.repaired for x in after.lines), Decimal(0)) > 0
    actions, n = repair_now(rig, after)
    assert (actions, n) == ([], 0)

    # Another writer's events, in a window of ours (one we repaired) and in one where we
    # sent nothing: reported, never sent; a day later, past Stripe's cancellation window.
    api = stripe.StripeClient(STRIPE_KEY, base_addresses={"meter_events": rig.server.url})
    session = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": rig.server.url})
    token = session.v2.billing.meter_event_session.create().authentication_token
    events: Any = [
        {
            "event_name": "api_calls",
            "identifier": f"someone-else-{c}",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at / 1000)),
            "payload": {"stripe_customer_id": c, "value": "7"},
        }
        for c, at in (("cus_a", base + 5 * MINUTE_MS), ("cus_b", base + 2 * HOUR_MS))
    ]
    api.v2.billing.meter_event_stream.create({"events": events}, {"api_key": token})
    rig.jump(SETTLE_MS / 1000 * 2)
    ours, theirs = repair_now(rig, reconciled(rig, base))[0]
    assert (ours.kind, ours.amount, theirs.kind, theirs.amount) == (
        repairing.PERSON, Decimal(7), repairing.PERSON, Decimal(7),
    )  # fmt: skip
    assert ours.reason.startswith("our repair pushes uc1r_") and "within 24 h" in ours.reason
    assert theirs.reason.startswith("the outbox delivered nothing here: another writer")
    rig.jump(25 * 3600)
    actions, n = repair_now(rig, reconciled(rig, base))
    assert [(a.line.customer, a.kind, a.amount) for a in actions] == [
        ("cus_a", repairing.PERSON, Decimal(7)),
        ("cus_b", repairing.PERSON, Decimal(7)),
    ]
    assert n == 0 and "past Stripe's 24 h cancellation window" in actions[0].reason
    assert "for_a_person=2" in repairing.format_actions(actions)


def lost_then_cancelled(rig: Rig, t: int, hours_later: float) -> None:
    """Stripe loses e0 (tokens, 5) and cus_b's bucket (api_calls, 19) after its 200s; then
    `hours_later` e0 is cancelled and the bucket falls to 18, both taken back (or recorded)
    by the emitter."""
    rig.control("config", drop_rate=1.0)
    ingest(rig, [("tokens", "cus_a", "e0", t + 1000, "5"), ("api_calls", "cus_b", "a0", t, "19")])
    run(rig)
    rig.control("config", drop_rate=0.0)
    rig.jump(hours_later * 3600)
    ingest(rig, cancels=[("tokens", "cus_a", "e0")])
    wrong_window(rig, "cus_b", t, Decimal(18))
    run(rig)


def test_repair_never_resends_cancelled_usage_and_restores_usage_that_grew_back(
    rig: Rig,
) -> None:
    """Stripe lost a push whose usage was cancelled past its 24 hours: no cancel is tried,
    the correction is recorded late; Stripe lacks it, and must go on lacking it. Stripe lost
    a bucket whose total then fell (a late record of the excess) and grew back (a replay):
    the whole bucket is missing, not the bucket less the stale excess."""
    t = minute(rig.now_ms() - 2 * HOUR_MS)
    lost_then_cancelled(rig, t, 24)
    outcomes = rig.store.query("SELECT outcome FROM stripe_corrections FINAL ORDER BY meter")
    assert [str(o) for (o,) in outcomes] == ["late", "late"]
    where = Where("g", "usage.events", rig.now_ms)
    replay(rig.store, rig.settings.meters, t // 1000, t // 1000 + 3600, where)
    run(rig)
    rig.jump(SETTLE_MS / 1000 * 2)
    actions, _ = repair_now(rig, reconciled(rig, t))
    assert {(a.line.meter, a.kind, a.amount) for a in actions} == {
        ("tokens", repairing.COVERED, Decimal(0)),
        ("api_calls", repairing.SEND, Decimal(19)),
    }
    run(rig)
    assert rig.billed() == {("api_calls", "cus_b"): Decimal(19)}  # e0 cancelled: not billed


def test_usage_stripe_lost_and_cancelled_within_24_hours_needs_no_repair(rig: Rig) -> None:
    """Within its 24 hours Stripe refuses those cancels for want of the events: nothing of
    them was billed (outcome `absent`, never `late`), their pushes are marked cancelled, and
    the planner pushes the bucket afresh; the replay's growth follows, and reconcile finds
    nothing to repair."""
    t = minute(rig.now_ms() - 2 * HOUR_MS)
    lost_then_cancelled(rig, t, 0)
    outcomes = rig.store.query("SELECT outcome FROM stripe_corrections FINAL ORDER BY meter")
    assert [str(o) for (o,) in outcomes] == ["absent", "absent"]
    assert rig.billed() == {("api_calls", "cus_b"): Decimal(18)}
    where = Where("g", "usage.events", rig.now_ms)
    replay(rig.store, rig.settings.meters, t // 1000, t // 1000 + 3600, where)
    run(rig)
    assert rig.billed() == {("api_calls", "cus_b"): Decimal(19)}
    rig.jump(SETTLE_MS / 1000 * 2)
    report = reconciled(rig, t)
    assert report.drifting == [] and report.corrected_late == []
    assert repair_now(rig, report) == ([], 0)


def test_replay_rewrites_wrong_windows_and_stripe_follows(rig: Rig) -> None:
    base = minute(rig.now_ms() - 2 * HOUR_MS)
    seed(rig, base)
    run(rig)
    truth = truth_of(rig)
    assert rig.billed() == truth
    # A faulty rollup: one window too high, one too low, one with no events at all; each
    # named, so the emitter billed them (and took the lowered one back from Stripe).
    wrong_window(rig, "cus_a", base + 2 * MINUTE_MS, Decimal(9))  # truth 3
    wrong_window(rig, "cus_b", base + 3 * MINUTE_MS, Decimal(1))  # truth 4
    wrong_window(rig, "cus_d", base + 4 * MINUTE_MS, Decimal(5))  # truth none
    run(rig)
    assert rig.billed() != truth

    where = Where("g", "usage.events", rig.now_ms)
    start, end = base // 1000, base // 1000 + 3600
    queue_rows = _count(rig, "planning_queue")
    changes, compared = replay(rig.store, rig.settings.meters, start, end, where, dry_run=True)
    assert compared >= 3 * 3 * 20
    assert [(c.customer, c.start - start, c.old, c.new, c.difference) for c in changes] == [
        ("cus_a", 120, Decimal(9), Decimal(3), Decimal(-6)),
        ("cus_b", 180, Decimal(1), Decimal(4), Decimal(3)),
        ("cus_d", 240, Decimal(5), None, Decimal(-5)),
    ]
    assert _count(rig, "planning_queue") == queue_rows  # a dry run writes nothing
    assert _count(rig, "window_jobs") == 0

    def killed(point: str) -> None:
        if point == "after_replay_windows":
            raise _Killed(point)

    crash_points.install(killed)  # killed after the window rows and names, before done
    try:
        with pytest.raises(_Killed):
            replay(rig.store, rig.settings.meters, start, end, where)
    finally:
        crash_points.install()
    changes, _ = replay(rig.store, rig.settings.meters, start, end, where)
    assert changes == []  # the windows are right; the pending job was finished
    assert _pending_replays(rig) == 0
    run(rig)
    assert rig.billed() == truth

    queue_rows = _count(rig, "planning_queue")
    again, _ = replay(rig.store, rig.settings.meters, start, end, where)
    assert again == [] and _count(rig, "planning_queue") == queue_rows  # causes nothing


def test_a_replay_killed_before_its_names_still_reaches_stripe(rig: Rig) -> None:
    """Window rows written, their names not: the next run names them from its pending job
    (without it the rows equal the ledger, a re-run sees no change, Stripe never follows)."""
    base = minute(rig.now_ms() - 2 * HOUR_MS)
    seed(rig, base)
    run(rig)
    truth = truth_of(rig)
    wrong_window(rig, "cus_a", base + 2 * MINUTE_MS, Decimal(9))
    run(rig)
    where = Where("g", "usage.events", rig.now_ms)
    start, end = base // 1000, base // 1000 + 3600

    def killed(point: str) -> None:
        if point == "after_window_rows":
            raise _Killed(point)

    crash_points.install(killed)
    try:
        with pytest.raises(_Killed):
            replay(rig.store, rig.settings.meters, start, end, where)
    finally:
        crash_points.install()
    assert replay(rig.store, rig.settings.meters, start, end, where)[0] == []
    run(rig)
    assert rig.billed() == truth


def wrong_window(rig: Rig, customer: str, minute_ms: int, value: Decimal) -> None:
    """A window row of api_calls as a faulty rollup would write it (the newest version),
    named for the planner as the rollup names what it recomputed."""
    rig.store.command(
        """INSERT INTO usage_windows
           SELECT 'api_calls', {c:String}, toDateTime({s:Int64}, 'UTC'), {v:Decimal(38, 9)}, 1,
                  {v:Decimal(38, 9)}, {v:Decimal(38, 9)}, {v:Decimal(38, 9)},
                  fromUnixTimestamp64Milli({ms:Int64}, 'UTC'), {v:Decimal(38, 9)},
                  fromUnixTimestamp64Milli({ms:Int64}, 'UTC'), now64(9, 'UTC')""",
        {"c": customer, "s": minute_ms // 1000, "ms": minute_ms, "v": str(value)},
    )
    rig.store.command(
        """INSERT INTO planning_queue (meter, customer_id, window_start, version, planned)
           VALUES ('api_calls', {c:String}, toDateTime({s:Int64}, 'UTC'), now64(9, 'UTC'), 0)""",
        {"c": customer, "s": minute_ms // 1000},
    )


def test_replay_reads_the_hours_it_replays_not_the_history(tmp_path: Path) -> None:
    """10 days of ledger, 3,000 events an hour of 50 customers (720,000 rows, 72,000 minute
    windows). A replay of one hour (dry run, then written, then again) reads that hour:
    ClickHouse refuses to read more rows than allowed (max_rows_to_read, under either
    table's history), so a scan of the ledger or of the windows fails the test."""
    store = ChdbBackend(tmp_path / "chdb", "usage")
    migrate(store)
    hours, per_hour = 10 * 24, 3_000
    now = int(time.time()) // 3600 * 3600 * 1000
    store.command(
        f"""INSERT INTO usage_events (meter, customer_id, event_id, event_time, value, topic,
                                      partition, offset, record_time, ver)
            SELECT 'api_calls', concat('c', toString(number % 50)), toString(number),
                   fromUnixTimestamp64Milli({now} - intDiv(number, {per_hour}) * 3600000
                                            + (number % 60) * 60000, 'UTC'),
                   1, 't', 1, number, now64(3), 1
            FROM numbers({hours * per_hour})"""
    )
    meters = [m for m in load_settings(meters=METERS).meters if m.name == "api_calls"]
    where = Where("g", "t", lambda: now)
    store.command(  # the windows, as the rollup wrote them
        """INSERT INTO usage_windows
           SELECT meter, customer_id, toStartOfMinute(event_time), sum(value), count(),
                  min(value), max(value), argMin(value, (event_time, event_id)),
                  min(event_time), argMax(value, (event_time, event_id)), max(event_time),
                  now64(9, 'UTC')
           FROM usage_events GROUP BY meter, customer_id, toStartOfMinute(event_time)"""
    )
    hour = now // 1000 - 5 * 24 * 3600
    store.command(
        """INSERT INTO usage_windows (meter, customer_id, window_start, sum_value, event_count,
                                      computed_at)
           VALUES ('api_calls', 'c7', toDateTime({h:Int64}, 'UTC'), 1, 1, now64(9, 'UTC'))""",
        {"h": hour + 7 * 60},
    )  # a wrong window in the hour: 1 where the ledger has 10 events of 1
    store.command("SET max_rows_to_read = 60000")
    try:
        changes, _ = replay(store, meters, hour, hour + 3600, where, dry_run=True)
        assert [(c.customer, c.start, c.old, c.new) for c in changes] == [
            ("c7", hour + 7 * 60, Decimal(1), Decimal(10))
        ]
        assert replay(store, meters, hour, hour + 3600, where)[0] == changes
        assert replay(store, meters, hour, hour + 3600, where)[0] == []
        with pytest.raises(Exception, match=r"TOO_MANY_ROWS|[Ll]imit for rows"):
            store.query("SELECT count() FROM usage_windows FINAL WHERE sum_value > 0")
    finally:
        store.close()


def test_replay_refuses_bad_arguments_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"meters": METERS}))
    base = ["--config", str(config), "replay"]
    assert main([*base, "--from", "0", "--to", "600", "--meter", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "usage-consumer replay: no meter 'nope' in the configuration "
        "(meters: api_calls, tokens, storage_gb)"
    ]
    assert main([*base, "--from", "yesterday", "--to", "600"]) == 2
    assert "not a time: 'yesterday'" in capsys.readouterr().err
    assert main([*base, "--from", "600", "--to", "600"]) == 2
    assert "--to must be after --from" in capsys.readouterr().err


def _pending_replays(rig: Rig) -> int:
    rows = rig.store.query("SELECT count() FROM window_jobs FINAL WHERE state = 1")
    return int(rows[0][0])


def _count(rig: Rig, table: str) -> int:
    return int(rig.store.query(f"SELECT count() FROM {table}")[0][0])


class _Killed(Exception):
    """A crash point reached: the process would have died here."""
