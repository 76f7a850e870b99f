"""Corrections end to end: cancel events go through the sink as the pipeline writes them,
the emitter takes the usage back from the emulator (or records why it cannot), and the
ClickHouse totals, Stripe's totals and `reconcile` agree on what happened."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from consumer import crash_points
from consumer.classify.classifier import Accepted, Classified
from consumer.classify.snapshot import Snapshot
from consumer.config import MeterConfig
from consumer.decode.event import DecodedEvent
from consumer.emitter.plan import queue
from consumer.emitter.plan.identifiers import per_event_identifier
from consumer.emitter.plan.outbox import CANCELLED
from consumer.emitter.truth.delivery import HOUR_MS, MINUTE_MS
from consumer.emitter.truth.summaries import SummaryReader
from consumer.local.emulator import EmulatorServer
from consumer.ops.reconcile import format_report, reconcile
from consumer.records import Record
from consumer.sinks.ledger import (
    RangeWrite,
    accepted_table,
    batch_id,
    cancels_of,
)
from consumer.store.backend import StoreError, StoreUnavailable
from tests.integration.conftest import METERS
from tests.integration.test_stripe_delivery import (
    MarkFailingStore,
    Rig,
    dies_in_one_cycle,
    drain,
    lost_marks,
    minute,
    open_rig,
)
from tests.integration.test_stripe_delivery import server as server  # a fixture
from tests.support.writes import accepted_batch, recompute_windows, write_effects

pytestmark = pytest.mark.integration

_batches = itertools.count()
Ev = tuple[str, str, str, int, str]  # meter, customer, event id, time, value
Cancel = tuple[str, str, str]  # meter, customer, cancelled event id


class CancelMarkFailingStore(MarkFailingStore):
    """Fails the CANCELLED marks while `failing`: a crash right after Stripe's adjustments;
    with `failing_records`, the final records instead: a crash right after the marks."""

    failing_records = False

    def insert_columns(self, table: str, columns: Mapping[str, pa.Array], token: str = "") -> None:
        cancels = table == "stripe_pushes" and CANCELLED in columns["status_rank"].to_pylist()
        final = table == "stripe_corrections" and "adjusting" not in columns["outcome"].to_pylist()
        if (self.failing and cancels) or (self.failing_records and final):
            self.refused += 1
            raise StoreUnavailable("injected: the cancelled marks or the record failed")
        self.inner.insert_columns(table, columns, token)


@pytest.fixture
def rig(server: EmulatorServer, tmp_path: Path) -> Iterator[Rig]:
    r = open_rig(server, tmp_path, [{**m, "stripe_value_format": "decimal"} for m in METERS])
    r.store = CancelMarkFailingStore(r.store.inner)
    try:
        yield r
    finally:
        r.store.close()


def meters(rig: Rig) -> dict[str, MeterConfig]:
    return {m.name: m for m in rig.settings.meters}


def ingest(rig: Rig, events: Sequence[Ev] = (), cancels: Sequence[Cancel] = ()) -> None:
    """One batch through the sink, exactly as the commit stage writes it."""
    by_name = meters(rig)
    topic = f"usage.{next(_batches)}"  # each batch its own ranges (and dedup token)
    snap = Snapshot({}, "test", rig.now_ms())

    def accepted(offset: int, meter: str, event: DecodedEvent) -> Accepted:
        rec = Record(topic, 0, offset, None, b"", event.timestamp_ms)
        return Accepted(rec, event, by_name[meter])

    usage = [
        accepted(i, m, DecodedEvent(e, by_name[m].event_name, c, Decimal(v), t, {}, 4))
        for i, (m, c, e, t, v) in enumerate(events)
    ]
    taken = [
        accepted(
            len(events) + i,
            m,
            DecodedEvent(f"x-{e}", by_name[m].event_name, c, Decimal(0), rig.now_ms(), {}, 4, e),
        )
        for i, (m, c, e) in enumerate(cancels)
    ]
    n = len(events) + len(cancels)
    ranges = [
        RangeWrite(
            topic,
            0,
            0,
            n,
            1,
            snap,
            Classified(accepted=accepted_batch(usage), cancels=taken),
        )
    ]
    token = batch_id(ranges)
    write_effects(rig.store, token, ranges, rig.now_ms())
    recompute_windows(rig.store, accepted_table(ranges), cancels_of(ranges))


def run(rig: Rig) -> None:
    emitter = rig.emitter()
    try:
        drain(emitter)
    finally:
        emitter.close()


def stripe_total(rig: Rig, name: str, customer: str) -> Decimal:
    return rig.billed().get((name, customer), Decimal(0))


def clickhouse_total(rig: Rig, meter: str, customer: str) -> Decimal:
    rows = rig.store.query(
        """SELECT toString(sum_value) FROM usage_totals
           WHERE meter = {m:String} AND customer_id = {c:String}""",
        {"m": meter, "c": customer},
    )
    return Decimal(rows[0][0]) if rows else Decimal(0)


def corrections(rig: Rig) -> dict[tuple[str, str], tuple[str, Decimal]]:
    """(cancelled id or bucket time, customer) -> (outcome, value)."""
    rows = rig.store.query(
        """SELECT if(cancelled_id = '', toString(toUnixTimestamp64Milli(bucket_start)),
                     cancelled_id), customer_id, outcome, toString(value)
           FROM stripe_corrections FINAL"""
    )
    return {(str(k), str(c)): (str(o), Decimal(v)) for k, c, o, v in rows}


def correction_rows(rig: Rig) -> int:
    return int(rig.store.query("SELECT count() FROM stripe_corrections")[0][0])


def status(rig: Rig, name: str, event_id: str) -> str:
    return rig.statuses()[per_event_identifier(name, event_id)][0]


def test_per_event_cancels_unsent_adjusted_and_late(rig: Rig) -> None:
    t = minute(rig.now_ms() - HOUR_MS)
    ingest(rig, [("tokens", "cus_a", f"e{i}", t + i, v) for i, v in enumerate(["5", "3", "2"])])
    ingest(rig, cancels=[("tokens", "cus_a", "e0")])  # before anything was sent
    run(rig)
    assert status(rig, "tokens", "e0") == "cancelled"
    assert stripe_total(rig, "tokens", "cus_a") == 5  # e0 never went to Stripe
    assert clickhouse_total(rig, "tokens", "cus_a") == 5

    ingest(rig, cancels=[("tokens", "cus_a", "e1")])  # sent minutes ago: an adjustment
    run(rig)
    assert stripe_total(rig, "tokens", "cus_a") == 2
    assert status(rig, "tokens", "e1") == "cancelled"

    rig.jump(24 * 3600)  # past Stripe's 24 hours: recorded, never dropped
    ingest(rig, cancels=[("tokens", "cus_a", "e2")])
    run(rig)
    assert stripe_total(rig, "tokens", "cus_a") == 2  # Stripe still bills it
    assert status(rig, "tokens", "e2") == "sent"
    assert clickhouse_total(rig, "tokens", "cus_a") == 0
    assert corrections(rig) == {
        ("e0", "cus_a"): ("unsent", Decimal(5)),
        ("e1", "cus_a"): ("adjusted", Decimal(3)),
        ("e2", "cus_a"): ("late", Decimal(2)),
    }
    assert (
        rig.metric("usage_consumer_stripe_corrections_total", meter="tokens", outcome="late") == 1
    )
    assert rig.metric("usage_consumer_stripe_late_corrections_value", meter="tokens") == 2

    rows = correction_rows(rig)
    run(rig)  # settled: nothing is done twice
    assert correction_rows(rig) == rows
    report = reconcile_now(rig, t)
    [line] = report.corrected_late
    assert (line.customer, line.meter, line.late, line.drift) == ("cus_a", "tokens", 2, 0)
    assert "late_corrections=2 " in format_report(report)


def reconcile_now(rig: Rig, start_ms: int) -> Any:
    reader = SummaryReader(rig.emitter()._sender.api, lambda: None)
    start = start_ms // 1000 // 3600 * 3600
    end = (rig.now_ms() // 1000 - 600) // 60 * 60
    return reconcile(rig.store, reader, rig.settings.meters, start, end, window="day")


def test_a_cancel_before_its_original_means_it_is_never_sent(rig: Rig) -> None:
    t = minute(rig.now_ms() - HOUR_MS)
    ingest(rig, cancels=[("tokens", "cus_a", "e0")])
    run(rig)
    ingest(rig, [("tokens", "cus_a", "e0", t, "5"), ("tokens", "cus_a", "e1", t, "1")])
    run(rig)
    assert stripe_total(rig, "tokens", "cus_a") == 1
    assert status(rig, "tokens", "e0") == "cancelled"
    assert corrections(rig) == {("e0", "cus_a"): ("unsent", Decimal(5))}


def test_an_aggregated_bucket_is_adjusted_and_pushed_again_then_netted_when_late(
    rig: Rig,
) -> None:
    t = minute(rig.now_ms() - HOUR_MS)
    ingest(
        rig, [("api_calls", "cus_a", "a1", t + 1, "4"), ("api_calls", "cus_a", "a2", t + 2, "6")]
    )
    run(rig)
    assert stripe_total(rig, "api_calls", "cus_a") == 10

    ingest(rig, cancels=[("api_calls", "cus_a", "a1")])
    run(rig)
    assert stripe_total(rig, "api_calls", "cus_a") == 6  # revision 1 cancelled, 6 pushed anew
    statuses = sorted(s for s, _, _ in rig.statuses().values())
    assert statuses == ["cancelled", "sent"]
    assert corrections(rig) == {(str(t), "cus_a"): ("adjusted", Decimal(4))}

    rig.jump(24 * 3600)
    ingest(rig, cancels=[("api_calls", "cus_a", "a2")])
    run(rig)
    assert stripe_total(rig, "api_calls", "cus_a") == 6  # too late to take back
    assert corrections(rig) == {(str(t), "cus_a"): ("late", Decimal(6))}
    rows = correction_rows(rig)
    run(rig)
    assert correction_rows(rig) == rows  # recorded once at this amount

    # Usage arriving later in the bucket nets against what Stripe bills too much.
    ingest(rig, [("api_calls", "cus_a", "a3", t + 3, "2.5")])
    run(rig)
    assert stripe_total(rig, "api_calls", "cus_a") == 6
    assert corrections(rig) == {(str(t), "cus_a"): ("late", Decimal("3.5"))}
    assert clickhouse_total(rig, "api_calls", "cus_a") == Decimal("2.5")


def die_at_the_cancelled_marks(rig: Rig) -> None:
    """One emitter cycle whose CANCELLED marks fail: Stripe adjusted, then the process dies."""
    dies_in_one_cycle(rig, StoreError)


@pytest.mark.parametrize("jump_hours", [0, 26], ids=["same-clock", "next-clock-a-day-ahead"])
def test_a_crash_between_the_adjustment_and_its_mark_cancels_once(
    rig: Rig, jump_hours: int
) -> None:
    """The restart finishes the adjustment it finds begun, even when its clock (not
    Stripe's) reads a day later: deciding afresh would record as still billed what Stripe
    no longer bills."""
    t = minute(rig.now_ms() - HOUR_MS)
    ingest(rig, [("tokens", "cus_a", "e0", t, "5"), ("tokens", "cus_a", "e1", t + MINUTE_MS, "7")])
    run(rig)
    ingest(rig, cancels=[("tokens", "cus_a", "e0")])
    die_at_the_cancelled_marks(rig)
    assert stripe_total(rig, "tokens", "cus_a") == 7
    assert status(rig, "tokens", "e0") == "sent"
    assert corrections(rig) == {("e0", "cus_a"): ("adjusting", Decimal(5))}  # the decision

    rig.clock.jump(jump_hours * 3600)
    run(rig)  # the restart cancels again (accepted) and marks
    assert stripe_total(rig, "tokens", "cus_a") == 7
    assert status(rig, "tokens", "e0") == "cancelled"
    assert corrections(rig) == {("e0", "cus_a"): ("adjusted", Decimal(5))}


def test_a_crash_between_the_marks_and_the_record_is_recorded_as_adjusted(rig: Rig) -> None:
    t = minute(rig.now_ms() - HOUR_MS)
    ingest(rig, [("tokens", "cus_a", "e0", t, "5"), ("tokens", "cus_a", "e1", t + MINUTE_MS, "7")])
    run(rig)
    ingest(rig, cancels=[("tokens", "cus_a", "e0")])
    dies_in_one_cycle(rig, StoreError, "failing_records")
    assert status(rig, "tokens", "e0") == "cancelled"  # the marks landed, the record did not

    run(rig)  # nothing is left to cancel: the begun adjustment is recorded as done
    assert corrections(rig) == {("e0", "cus_a"): ("adjusted", Decimal(5))}
    assert stripe_total(rig, "tokens", "cus_a") == 7


def test_reconcile_takes_the_last_value_by_millisecond_as_stripe_does(rig: Rig) -> None:
    """Two `last` readings within one second: Stripe keeps the later by its millisecond
    timestamp, and so must reconcile (it compared whole seconds, and reported drift)."""
    t = minute(rig.now_ms() - HOUR_MS) + 5_000
    ingest(
        rig,
        [("storage_gb", "cus_a", "g2", t + 720, "263.8"), ("storage_gb", "cus_a", "g1", t, "12.8")],
    )
    run(rig)
    assert stripe_total(rig, "storage_gb", "cus_a") == Decimal("263.8")
    [line] = [x for x in reconcile_now(rig, t).lines if x.meter == "storage_gb"]
    assert (line.delivered, line.stripe, line.drift) == (Decimal("263.8"), Decimal("263.8"), 0)


def test_cancellations_that_cannot_settle_never_hold_back_the_others(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from consumer.emitter.truth import corrections as module

    monkeypatch.setattr(module, "PER_CYCLE", 2)
    t = minute(rig.now_ms() - HOUR_MS)
    # Originals in the ledger whose pushes are not written yet (keys sort first): pages of
    # two find them unsettled, and the pages after them are read all the same.
    rig.store.command(
        """INSERT INTO usage_events (meter, customer_id, event_id, event_time, value, topic,
                                     partition, offset, record_time, ver)
           SELECT 'tokens', 'cus_a', concat('aa', toString(number)),
                  fromUnixTimestamp64Milli({t:Int64}, 'UTC'), 1, 'x', 0, number,
                  fromUnixTimestamp64Milli({t:Int64}, 'UTC'), 1
           FROM numbers(3)""",
        {"t": t},
    )
    ingest(rig, [("tokens", "cus_a", f"z{i}", t + i, "4") for i in range(3)])
    ingest(rig, cancels=[("tokens", "cus_a", i) for i in ("aa0", "aa1", "aa2", "z0", "z1")])
    run(rig)  # the pages behind are read in the first cycle, before z0 and z1 are sent
    assert corrections(rig) == {
        ("z0", "cus_a"): ("unsent", Decimal(4)),
        ("z1", "cus_a"): ("unsent", Decimal(4)),
    }
    assert stripe_total(rig, "tokens", "cus_a") == 4  # z2 only


def test_a_late_bucket_never_sends_a_revision_that_was_not_sent_yet(rig: Rig) -> None:
    t = minute(rig.now_ms() - HOUR_MS)
    ingest(rig, [("api_calls", "cus_a", "a1", t + 1, "10")])
    run(rig)
    rig.jump(24 * 3600)  # revision 1 is past Stripe's 24 hours
    ingest(rig, [("api_calls", "cus_a", "a2", t + 2, "3")])
    planner = rig.emitter()
    try:
        assert planner._plan(rig.now_ms(), queue.take(rig.store)) == 1  # revision 2 (3): not sent
    finally:
        planner.close()
    ingest(rig, cancels=[("api_calls", "cus_a", "a1")])  # the bucket falls to 3
    run(rig)
    # Stripe keeps the 10 it was sent; revision 2 never goes, so it bills 7 too much, not 10.
    assert stripe_total(rig, "api_calls", "cus_a") == 10
    assert corrections(rig) == {(str(t), "cus_a"): ("late", Decimal(7))}
    assert sorted(s for s, _, _ in rig.statuses().values()) == ["cancelled", "sent"]
    assert clickhouse_total(rig, "api_calls", "cus_a") == 3


def test_an_aggregated_adjustment_interrupted_is_finished_after_a_clock_jump(rig: Rig) -> None:
    t = minute(rig.now_ms() - HOUR_MS)
    ingest(
        rig, [("api_calls", "cus_a", "a1", t + 1, "4"), ("api_calls", "cus_a", "a2", t + 2, "6")]
    )
    run(rig)
    ingest(rig, cancels=[("api_calls", "cus_a", "a1")])
    die_at_the_cancelled_marks(rig)  # revision 1 cancelled at Stripe
    assert stripe_total(rig, "api_calls", "cus_a") == 0
    assert corrections(rig) == {(str(t), "cus_a"): ("adjusting", Decimal(4))}

    rig.clock.jump(26 * 3600)  # this process's clock only: Stripe's still takes the cancel
    run(rig)
    assert stripe_total(rig, "api_calls", "cus_a") == 6  # the bucket pushed afresh
    assert corrections(rig) == {(str(t), "cus_a"): ("adjusted", Decimal(4))}
    assert clickhouse_total(rig, "api_calls", "cus_a") == 6


def test_a_record_replaced_by_a_process_whose_clock_is_behind_still_wins(rig: Rig) -> None:
    """stripe_corrections keeps a key's highest version: a process 3 hours behind the one
    that recorded a late bucket must still replace that record when the amount moves."""
    t = minute(rig.now_ms() - HOUR_MS)
    ingest(rig, [("api_calls", "cus_a", "a1", t + 1, "10")])
    run(rig)
    rig.jump(24 * 3600)
    ingest(rig, cancels=[("api_calls", "cus_a", "a1")])
    run(rig)
    assert corrections(rig) == {(str(t), "cus_a"): ("late", Decimal(10))}

    rig.clock.jump(-3 * 3600)  # the next process's clock is behind
    ingest(rig, [("api_calls", "cus_a", "a2", t + 2, "4")])  # nets against the excess
    run(rig)
    assert corrections(rig) == {(str(t), "cus_a"): ("late", Decimal(6))}
    rows = correction_rows(rig)
    run(rig)
    assert correction_rows(rig) == rows  # settled at this amount: written once
    assert stripe_total(rig, "api_calls", "cus_a") == 10


def test_an_adjustment_finished_after_its_bucket_was_planned_pushes_it_afresh(rig: Rig) -> None:
    """A cycle may take and record a bucket's names while an adjustment of it is still
    under way (its outcome unknown, or another process's): finishing the adjustment later
    names the bucket again, so the planner pushes what is left of it."""
    t = minute(rig.now_ms() - HOUR_MS)
    ingest(
        rig, [("api_calls", "cus_a", "a1", t + 1, "4"), ("api_calls", "cus_a", "a2", t + 2, "6")]
    )
    run(rig)
    ingest(rig, cancels=[("api_calls", "cus_a", "a1")])
    die_at_the_cancelled_marks(rig)
    queue.planned(rig.store, queue.take(rig.store))  # the names taken and recorded
    run(rig)
    assert stripe_total(rig, "api_calls", "cus_a") == 6
    assert corrections(rig) == {(str(t), "cus_a"): ("adjusted", Decimal(4))}


def test_a_shrunk_bucket_waiting_for_an_outcome_is_looked_at_again(rig: Rig) -> None:
    """The bucket's revision was sent but its answer lost when its usage is cancelled: the
    cycle waits for the outcome and names the bucket again, so a later cycle adjusts it."""
    t = minute(rig.now_ms() - HOUR_MS)
    ingest(
        rig, [("api_calls", "cus_a", "a1", t + 1, "4"), ("api_calls", "cus_a", "a2", t + 2, "6")]
    )
    cancels_fail = rig.store
    rig.store = MarkFailingStore(cancels_fail.inner)
    lost_marks(rig)  # Stripe holds revision 1 (10); the outbox does not know yet
    rig.store = cancels_fail
    ingest(rig, cancels=[("api_calls", "cus_a", "a1")])
    run(rig)
    assert corrections(rig) == {(str(t), "cus_a"): ("adjusted", Decimal(4))}
    assert stripe_total(rig, "api_calls", "cus_a") == 6


def test_a_cycle_never_reads_the_ledger_for_cancellations(rig: Rig) -> None:
    """2,000,000 ledger rows and a cancel whose original never came: every cycle looks at
    that cancel again, and ClickHouse refuses any read of more than 100,000 rows."""
    t = minute(rig.now_ms() - HOUR_MS)
    rig.store.command(
        """INSERT INTO usage_events (meter, customer_id, event_id, event_time, value, topic,
                                     partition, offset, record_time, ver)
           SELECT 'tokens', concat('cus_', toString(number % 1000)), toString(number),
                  fromUnixTimestamp64Milli({t:Int64} - intDiv(number, 1000) * 60000, 'UTC'),
                  1, 'x', 0, number, now64(3), 1
           FROM numbers(2000000)""",
        {"t": t},
    )
    ingest(rig, [("tokens", "cus_a", "e1", t + 1, "5")])
    ingest(rig, cancels=[("tokens", "cus_a", "never-came"), ("tokens", "cus_a", "e1")])
    rig.store.command("SET max_rows_to_read = 100000")
    try:
        run(rig)
        run(rig)
    finally:
        rig.store.command("SET max_rows_to_read = 0")
    assert corrections(rig) == {("e1", "cus_a"): ("unsent", Decimal(5))}


def test_a_cycle_reads_the_cancellations_of_the_named_customers_only(rig: Rig) -> None:
    """300,000 settled cancellations of other customers, all within the lookback: a cycle
    reads those of the customers whose windows were named since the last one, and
    ClickHouse refuses any read of more than 100,000 rows."""
    t = minute(rig.now_ms() - HOUR_MS)
    emitter = rig.emitter()
    try:
        drain(emitter)  # the first cycle after the migrations plans everything, once
        rig.store.command(
            """INSERT INTO cancellations (meter, customer_id, cancelled_id, event_id, event_time,
                                          topic, partition, offset, record_time)
               SELECT 'tokens', concat('cus_', toString(number % 1000)),
                      concat('old', toString(number)), concat('x', toString(number)),
                      now64(3), 'x', 0, number, now64(3)
               FROM numbers(300000)"""
        )
        rig.store.command(
            """INSERT INTO stripe_corrections (meter, customer_id, bucket_start, cancelled_id,
                                               mode, outcome, value, identifiers, reason,
                                               updated_at)
               SELECT 'tokens', concat('cus_', toString(number % 1000)), now64(3),
                      concat('old', toString(number)), 'per_event', 'adjusted', 1, [], '',
                      now64(3)
               FROM numbers(300000)"""
        )
        ingest(rig, [("tokens", "cus_a", "e1", t + 1, "5")])
        drain(emitter)
        ingest(rig, cancels=[("tokens", "cus_a", "e1")])
        rig.store.command("SET max_rows_to_read = 100000")
        try:
            drain(emitter)
        finally:
            rig.store.command("SET max_rows_to_read = 0")
    finally:
        emitter.close()
    assert corrections(rig)[("e1", "cus_a")] == ("adjusted", Decimal(5))
    assert stripe_total(rig, "tokens", "cus_a") == 0


def test_a_cancellation_moves_the_carry_an_emitter_keeps(
    server: EmulatorServer, tmp_path: Path
) -> None:
    """Whole numbers: one emitter sends three 0.7s (0, 1, 1: 0.1 carried), takes the last
    back, and then sends another 0.7. The carry it kept from the first sends is stale
    after the cancellation (0.4 is carried now): Stripe must bill floor(2.1) = 2."""
    whole = open_rig(server, tmp_path, METERS)  # sum meters in whole format
    emitter = whole.emitter()
    try:
        t = minute(whole.now_ms() - HOUR_MS)
        ingest(whole, [("tokens", "cus_a", f"e{i}", t + i, "0.7") for i in range(3)])
        drain(emitter)
        assert stripe_total(whole, "tokens", "cus_a") == 2
        ingest(whole, cancels=[("tokens", "cus_a", "e2")])
        drain(emitter)
        assert corrections(whole) == {("e2", "cus_a"): ("adjusted", Decimal(1))}  # as billed
        assert stripe_total(whole, "tokens", "cus_a") == 1
        ingest(whole, [("tokens", "cus_a", "e3", t + 10, "0.7")])
        drain(emitter)
        assert stripe_total(whole, "tokens", "cus_a") == 2
    finally:
        emitter.close()
        whole.store.close()


def lost_by_stripe(rig: Rig, *events: Ev) -> None:
    """`events` ingested and sent while the emulator answers 200 and loses every event."""
    rig.control("config", drop_rate=1.0)
    ingest(rig, events)
    run(rig)
    rig.control("config", drop_rate=0.0)


def test_a_cancel_of_an_event_stripe_lost_is_recorded_absent_not_late(rig: Rig) -> None:
    """Stripe answered 200 for e0 and lost it, so it refuses the cancel (no such event):
    nothing of e0 is billed, so nothing is over-billed either."""
    t = minute(rig.now_ms() - HOUR_MS)
    lost_by_stripe(rig, ("tokens", "cus_a", "e0", t, "5"))
    ingest(rig, [("tokens", "cus_a", "e1", t + 1, "7")])
    ingest(rig, cancels=[("tokens", "cus_a", "e0")])
    run(rig)
    assert corrections(rig) == {("e0", "cus_a"): ("absent", Decimal(5))}
    assert status(rig, "tokens", "e0") == "cancelled"
    assert rig.metric("usage_consumer_stripe_late_corrections_value", meter="tokens") == 0
    assert (
        rig.metric("usage_consumer_stripe_corrections_total", meter="tokens", outcome="absent") == 1
    )
    assert stripe_total(rig, "tokens", "cus_a") == 7 == clickhouse_total(rig, "tokens", "cus_a")
    report = reconcile_now(rig, t)
    assert report.corrected_late == [] and report.drifting == []
    rows = correction_rows(rig)
    run(rig)  # settled: nothing is done twice
    assert correction_rows(rig) == rows


def lost_middle_revision(rig: Rig, t: int) -> None:
    """A bucket of three sent revisions (4, 6, 2), the second lost by Stripe; then the 4 is
    cancelled: the bucket falls to 8 while 12 was pushed."""
    ingest(rig, [("api_calls", "cus_a", "a1", t + 1, "4")])
    run(rig)
    lost_by_stripe(rig, ("api_calls", "cus_a", "a2", t + 2, "6"))
    ingest(rig, [("api_calls", "cus_a", "a3", t + 3, "2")])
    run(rig)
    assert stripe_total(rig, "api_calls", "cus_a") == 6  # 4 + 2: the 6 was lost
    ingest(rig, cancels=[("api_calls", "cus_a", "a1")])


def test_a_bucket_with_a_revision_stripe_lost_is_cancelled_whole_and_pushed_afresh(
    rig: Rig,
) -> None:
    """Every revision is cancelled and marked, the lost one included (Stripe bills none of
    it), whatever its place among them; the planner then pushes the bucket's total."""
    t = minute(rig.now_ms() - HOUR_MS)
    lost_middle_revision(rig, t)
    run(rig)
    assert stripe_total(rig, "api_calls", "cus_a") == 8
    assert clickhouse_total(rig, "api_calls", "cus_a") == 8
    statuses = sorted(s for s, _, _ in rig.statuses().values())
    assert statuses == ["cancelled", "cancelled", "cancelled", "sent"]
    assert corrections(rig) == {(str(t), "cus_a"): ("absent", Decimal(4))}
    assert rig.metric("usage_consumer_stripe_late_corrections_value", meter="api_calls") == 0
    report = reconcile_now(rig, t)
    assert report.corrected_late == [] and report.drifting == []


@pytest.mark.parametrize("switch", ["failing", "failing_records"], ids=["marks", "record"])
def test_a_crash_in_a_bucket_with_a_lost_revision_cancels_each_once(rig: Rig, switch: str) -> None:
    """Killed after Stripe's answers (before the marks, or before the final record): the
    restart finishes the decision, and the bucket ends as without the crash."""
    t = minute(rig.now_ms() - HOUR_MS)
    lost_middle_revision(rig, t)
    dies_in_one_cycle(rig, StoreError, switch)
    assert stripe_total(rig, "api_calls", "cus_a") == 0  # both held revisions cancelled
    run(rig)
    assert stripe_total(rig, "api_calls", "cus_a") == 8
    assert corrections(rig) == {(str(t), "cus_a"): ("absent", Decimal(4))}
    assert sorted(s for s, _, _ in rig.statuses().values()) == 3 * ["cancelled"] + ["sent"]


class _Killed(Exception):
    """The process dies at a crash point."""


def test_a_revision_stripe_refuses_never_stops_the_others(rig: Rig) -> None:
    """A decision to adjust, killed before its first request, is finished a day later:
    Stripe refuses the revision it received over 24 hours ago (it bills it) and still
    cancels the newer one, which is marked; what stays billed is the usage, so nothing is
    recorded as over-billed."""
    t = minute(rig.now_ms() - HOUR_MS)
    ingest(rig, [("api_calls", "cus_a", "a1", t + 1, "4")])
    run(rig)
    rig.jump(2 * 3600)
    ingest(rig, [("api_calls", "cus_a", "a2", t + 2, "6")])
    run(rig)
    assert stripe_total(rig, "api_calls", "cus_a") == 10  # revisions 1 (4) and 2 (6)
    ingest(rig, cancels=[("api_calls", "cus_a", "a2")])

    def killed(point: str) -> None:
        if point == "after_adjustment_intent":
            raise _Killed(point)

    emitter = rig.emitter()
    crash_points.install(killed)
    try:
        with pytest.raises(_Killed):
            emitter.run_once()
    finally:
        crash_points.install()
        emitter.close()
    rig.jump(22.5 * 3600)  # Stripe received revision 1 24.5 hours ago, revision 2 22.5
    run(rig)
    assert stripe_total(rig, "api_calls", "cus_a") == 4
    assert clickhouse_total(rig, "api_calls", "cus_a") == 4
    outcome, value = corrections(rig)[str(t), "cus_a"]
    assert (outcome, value) == ("adjusted", Decimal(6))
    assert sorted(s for s, _, _ in rig.statuses().values()) == ["cancelled", "sent"]
    assert rig.metric("usage_consumer_stripe_late_corrections_value", meter="api_calls") == 0
