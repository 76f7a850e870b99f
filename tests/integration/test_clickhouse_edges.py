"""ClickHouse edges, each checked as ground truth == ClickHouse == Stripe emulator, exactly:

1. retries further apart than the insert-dedup window (one block) still count once (P3);
2. a re-formed range of more rows than max_block_size (an INSERT ... SELECT in blocks);
3. a sustained rate of small flushes against the server's parts_to_throw_insert;
4. partitions assigned while ClickHouse is down: paused, shown, resumed from ingest_state.

1 and 2 are crash-harness scenarios (`make chaos` runs them too); CHAOS_SEED=<n> replays
one. 3 and 4 run the consumer in this process, where the store can be watched and failed.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from consumer.local.broker import TansuBroker
from consumer.local.demo import produce_messages, stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.local.sample import Sample, generate
from consumer.ops.totals import clickhouse_totals, side_counts
from consumer.store import Backend, open_store
from consumer.store.chdb import ChdbBackend
from consumer.store.migrations import migrate
from tests.chaos.harness import Harness, Outcome
from tests.chaos.scenarios import (
    DEDUP_TABLES,
    MAX_BLOCK_SIZE,
    NO_LEDGER_MERGES,
    clickhouse_edges,
    tiny_dedup_window,
)
from tests.integration.clickhouse_probes import (
    OutageStore,
    PartsWatch,
    RangeRows,
    Running,
    commit_group_offsets,
    group_offsets,
    merge_tree_setting,
    produce_steadily,
    ranges,
    table_setting,
    window_mismatches,
)
from tests.integration.conftest import make_settings, wait_for
from tests.integration.test_pipeline import ours

pytestmark = pytest.mark.integration
SCENARIOS = {sc.name: sc for sc in clickhouse_edges()}
RATE = 100  # messages a second for the sustained run: each flush carries a handful


def _seed() -> int:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    print(f"chaos seed={seed} (CHAOS_SEED={seed} replays it)")
    return seed


def _run(workdir: Path, name: str) -> tuple[Outcome, ChdbBackend]:
    """Run one harness scenario; returns its outcome and its store, opened for reading."""
    seed = _seed()
    outcome = Harness(workdir, seed).run(SCENARIOS[name])
    print(outcome.line())
    assert outcome.ok, f"seed={seed}: {outcome.line()}"
    return outcome, ChdbBackend(workdir / name / "chdb", "usage")


def _expected_dead(sample: Sample) -> int:
    k = sample.kinds
    return k["invalid"] + k["future"] + k["undecodable"]


def _window_rows(store: Backend, tag: str, token: str) -> int:
    store.command(
        "INSERT INTO usage_windows (meter, customer_id, window_start, sum_value, event_count) "
        f"SETTINGS insert_deduplication_token = '{token}' "
        f"VALUES ('m', '{tag}', '2026-01-01 00:00:00', 1, 1)"
    )
    return int(store.query("SELECT count() FROM usage_windows")[0][0])


def test_a_dedup_window_of_one_block_lets_a_retry_land_again(tmp_path: Path) -> None:
    """The premise of the next test: with the window set to one block, a retry after one
    other insert lands again; with the schema's window it is dropped."""
    store = ChdbBackend(tmp_path / "chdb", "usage")
    try:
        migrate(store)
        # Count physical rows: no background merge may collapse the re-landed copy.
        store.command(NO_LEDGER_MERGES.replace("usage_events", "usage_windows"))
        assert _window_rows(store, "a", "t1") == 1
        assert _window_rows(store, "b", "t2") == 2
        assert _window_rows(store, "a", "t1") == 2  # the schema's window: the retry is dropped
        for sql in tiny_dedup_window():
            store.command(sql)
        assert {
            table_setting(store, t, "non_replicated_deduplication_window") for t in DEDUP_TABLES
        } == {1}
        assert _window_rows(store, "c", "t3") == 3
        assert _window_rows(store, "d", "t4") == 4
        assert _window_rows(store, "c", "t3") == 5  # one block in between: it lands again
    finally:
        store.close()


def covered_by_done_chunks(r: RangeRows, rs: list[RangeRows]) -> bool:
    """Whether done ranges strictly inside `r` cover every one of its offsets."""
    chunks = sorted(
        (c.start, c.end)
        for c in rs
        if c.done
        and c.partition == r.partition
        and r.start <= c.start
        and c.end <= r.end
        and (c.start, c.end) != (r.start, r.end)
    )
    at = r.start
    for a, b in chunks:
        if a > at:
            return False
        at = max(at, b)
    return at >= r.end


def test_retries_beyond_the_dedup_window_count_once(tmp_path: Path) -> None:
    outcome, store = _run(tmp_path, "dedup-window-1")
    sc = SCENARIOS["dedup-window-1"]
    try:
        windows = {
            t: table_setting(store, t, "non_replicated_deduplication_window") for t in DEDUP_TABLES
        }
        rs = ranges(store, f"{sc.name}-group", f"{sc.name}.events")
        mismatches = window_mismatches(store)
        physical, final = (
            int(store.query(f"SELECT count() FROM usage_events {f}")[0][0]) for f in ("", "FINAL")
        )
    finally:
        store.close()
    assert outcome.kills == len(sc.kill_points)
    assert set(windows.values()) == {1}, f"the dedup window did not stay at one block: {windows}"
    reformed = [r for r in rs if r.attempts > 1]
    # A range killed poison_after_attempts times is searched in chunks (P7): its offsets are
    # retried by the chunk ranges, which must cover it, done.
    split = [r for r in reformed if not r.done and covered_by_done_chunks(r, rs)]
    # Three kills left an intent open (the fourth, after_done, did not): each was re-formed.
    # Counted by formations, not by the highest attempt: a re-form classified before its
    # kill was withdrawn (P7), so two kills of one range can both stop at attempt 2.
    assert sum(r.reforms for r in reformed) + len(split) >= 3, rs
    assert all(r.done or r in split for r in rs), rs
    # The kills that follow a ledger write (after the usage events, after the whole insert
    # step) are each followed by the re-formed rows landing again: no token dropped the retry
    # (the ledger keeps every row, merges being off), and they still count once. Two kills
    # may hit one range (a loaded host's restart can fetch the other partition first, making
    # the re-form the third batch again), so the landings are counted, not the ranges. Only
    # events another partition also wrote may lack a copy (the first write may have carried
    # both). The pushes are written beside the ledger, so a kill after them may come before
    # the ledger landed: that kill adds no landing.
    landings = sum(r.written_again // (r.rows - r.shared) for r in reformed if r.rows > r.shared)
    assert landings >= 2, reformed
    assert not mismatches, mismatches
    print(
        f"dedup-window-1: re-formed ranges={len(reformed)} "
        f"rows written again={sum(r.written_again for r in reformed)} "
        f"ledger physical={physical} distinct={final}"
    )


def test_a_reformed_range_larger_than_a_block_counts_once(tmp_path: Path) -> None:
    outcome, store = _run(tmp_path, "big-range")
    sc = SCENARIOS["big-range"]
    try:
        rs = ranges(store, f"{sc.name}-group", f"{sc.name}.events")
        mismatches = window_mismatches(store)
    finally:
        store.close()
    assert outcome.kills == len(sc.kill_points)
    big = [r for r in rs if r.rows > MAX_BLOCK_SIZE]
    assert big, f"no range held more than {MAX_BLOCK_SIZE} accepted events: {rs}"
    # Killed after the ledger insert and after the insert step of its re-form: the third
    # formation completed. Each re-form was classified before its kill, so its attempt was
    # withdrawn (P7): three formations, two withdrawals, and the attempt stays at two.
    assert big[0].intents == 5 and big[0].attempts == 2 and big[0].done, big
    assert big[0].windows > MAX_BLOCK_SIZE, big  # the window recompute crossed a block too
    assert all(r.done for r in rs), rs
    assert not mismatches, mismatches
    print(f"big-range: {big[0]}")


def test_sustained_small_flushes_keep_parts_well_below_the_limit(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings = make_settings(
        broker,
        emulator,
        tmp_path,
        unique,
        pipeline={"batch_max_messages": 15, "batch_max_seconds": 0.02},
    )
    k = settings.kafka
    broker.create_topics({k.topic: 3, k.dlq_topic: 1, k.late_topic: 1})
    prefix = f"cus_{unique}_"
    sample = generate(2_000, 8, 3, int(time.time() * 1000), seed=31, customer_prefix=prefix)
    watch = PartsWatch(open_store(settings.clickhouse))
    try:
        throw = merge_tree_setting(watch, "parts_to_throw_insert")
        delay = merge_tree_setting(watch, "parts_to_delay_insert")
        running = Running(settings, watch).start()
        watch.start()
        started = time.monotonic()
        try:
            ends = produce_steadily(sample.messages, broker.bootstrap, k.topic, RATE)
            running.wait_drained(ends)
            seconds = time.monotonic() - started
        finally:
            running.stop()
            watch.stop()
        after = watch.sample()
        totals, sides = clickhouse_totals(watch, settings.meters), side_counts(watch)
        mismatches = window_mismatches(watch)
    finally:
        watch.close()
    flushes = watch.inserts.get("usage_events", 0)
    peak_table, peak = max(watch.peak.items(), key=lambda kv: kv[1])
    print(
        f"sustained: {len(sample.messages)} messages in {seconds:.0f}s, {flushes} ledger "
        f"flushes ({flushes / seconds:.1f}/s), {sum(watch.inserts.values())} inserts, "
        f"{watch.samples} part samples; peak active parts {peak} ({peak_table[0]}), "
        f"after {max(after.values())}; parts_to_delay_insert={delay} "
        f"parts_to_throw_insert={throw}; peaks {sorted(watch.peak.items())}"
    )
    assert flushes >= 100, f"not a sustained run of small flushes: {flushes}"
    # Well below the limit, and not growing with the flushes: without merges keeping up,
    # every table would hold about a part per insert, at least `flushes` of them.
    bound = min(throw // 10, flushes // 2)
    assert peak <= bound, f"{peak_table}: {peak} active parts (bound {bound}, throw {throw})"
    assert max(after.values()) <= bound, after
    assert not mismatches, mismatches
    assert totals == sample.truth
    assert ours(stripe_totals(settings, emulator.url), prefix) == sample.truth
    assert sum(v for r, v in sides.items() if r != "late") == _expected_dead(sample)


def test_assignment_while_clickhouse_is_down_pauses_then_resumes_from_ingest_state(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings = make_settings(broker, emulator, tmp_path, unique)
    k = settings.kafka
    broker.create_topics({k.topic: 3, k.dlq_topic: 1, k.late_topic: 1})
    prefix = f"cus_{unique}_"
    sample = generate(6_000, 6, 3, int(time.time() * 1000), seed=23, customer_prefix=prefix)
    half = len(sample.messages) // 2
    first = produce_messages(sample.messages[:half], broker.bootstrap, k.topic)
    store = OutageStore(open_store(settings.clickhouse))
    try:
        running = Running(settings, store).start()
        try:
            running.wait_drained(first)
        finally:
            running.stop()
        ends = dict(first)
        for p, end in produce_messages(sample.messages[half:], broker.bootstrap, k.topic).items():
            ends[p] = max(ends[p], end)
        # Kafka's committed offsets run ahead of ingest_state: resuming from them would skip
        # 150 offsets of each partition, and the totals would show it.
        ahead = {p: first[p] + 150 for p in first}
        assert all(ahead[p] < ends[p] for p in ahead)
        commit_group_offsets(broker.bootstrap, k.group_id, k.topic, ahead)

        running = Running(settings, store)  # built (schema, config) while ClickHouse is up
        store.down.set()
        running.start()
        try:
            wait_for(lambda: store.failed_state_reads >= 3, "ingest_state reads during outage")
            probes = []
            for _ in range(8):
                time.sleep(0.5)
                probes.append((running.get("/healthz")[0], *running.get("/readyz")))
            during = {
                "alive": running.alive(),
                "consumed": running.metric("usage_consumer_events_consumed_total"),
                "committed": group_offsets(broker.bootstrap, k.group_id, k.topic, 3),
                "invalid": running.metric("usage_consumer_events_invalid_total"),
                "ranges": running.metric("usage_consumer_ranges_committed_total"),
            }
            store.down.clear()
            running.wait_drained(ends)
            final_offsets = group_offsets(broker.bootstrap, k.group_id, k.topic, 3)
        finally:
            running.stop()
        totals, sides = clickhouse_totals(store, settings.meters), side_counts(store)
        mismatches = window_mismatches(store)
    finally:
        store.close()
    print(f"outage: {store.failed} store calls failed; probes {probes[:2]}...; {during}")
    assert during["alive"], "the consumer stopped while ClickHouse was down"
    assert during["committed"] == ahead, "offsets moved while ClickHouse was down"
    assert during["invalid"] == 0 and during["ranges"] == 0, during
    assert all(live == 200 for live, _, _ in probes), probes  # the poll loop runs on
    assert final_offsets == ends
    assert not mismatches, mismatches
    assert totals == sample.truth
    assert ours(stripe_totals(settings, emulator.url), prefix) == sample.truth
    assert sum(v for r, v in sides.items() if r != "late") == _expected_dead(sample)
    # Readiness names ClickHouse for as long as the partitions wait for it (P4).
    not_ready = [(s, body) for _, s, body in probes if s != 503 or "clickhouse" not in body]
    assert not not_ready, f"/readyz did not show ClickHouse down: {not_ready}"
