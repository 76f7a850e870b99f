"""A zombie instance (P4): A stalls inside a write for longer than max.poll.interval.ms,
librdkafka evicts it, and B (same process, same chDB store) takes its partitions over and
moves on through more data. Then A wakes up, finishes its stale write (ledger rows,
windows, done row) and commits to Kafka.

What must hold: totals in the ledger, the windows (hourly view, totals) and the Stripe
emulator equal ground truth exactly; the latest ingest_state of every partition stays B's
(argMax fencing), whatever A writes late; the group's committed offsets never go back to
A's stale ends; and a later owner resumes from ingest_state even if Kafka's offsets are
rewound. A then leaves the group cleanly.

The stall is a wrapper around the shared store that blocks A's thread *before* it enters
the backend (whose lock would otherwise stall B too), and A has a ledger lock of its own, as
an instance of another process would. A's writes after the stall go
without their insert dedup tokens, as if the stall had outlived the token window: the
stale rows really land, and only the keyed tables can make them converge (P3).
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from confluent_kafka import Consumer, TopicPartition

from consumer.app import Pipeline, build_pipeline
from consumer.clock import SystemClock
from consumer.intent.state import DONE, INTENT, load_states
from consumer.local.broker import TansuBroker
from consumer.local.demo import produce_messages, stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.local.sample import Message, generate
from consumer.metrics import Metrics
from consumer.ops.health import Health
from consumer.ops.totals import clickhouse_totals
from consumer.store import Backend, open_store
from tests.integration.conftest import (
    clickhouse_hourly,
    counter_total,
    group_committed,
    ledger_totals,
    make_settings,
    stripe_hourly,
    wait_for,
    wait_outbox_drained,
)
from tests.integration.store_wrap import Passthrough
from tests.integration.test_pipeline import ours

pytestmark = pytest.mark.integration

POLL_MS = 6000  # librdkafka requires max.poll.interval.ms >= session.timeout.ms
KAFKA = {
    "consumer_librdkafka": {
        "session.timeout.ms": "6000",
        "heartbeat.interval.ms": "1000",
        "max.poll.interval.ms": str(POLL_MS),
    }
}
PARTITIONS = (0, 1)


class Stall(Passthrough):
    """The zombie's view of the shared store. Once armed, its first insert into `table`
    blocks until `release`; everything it inserts from then on goes without a dedup token."""

    def __init__(self, inner: Backend, table: str) -> None:
        super().__init__(inner)
        self.table = table
        self.armed = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.late: list[str] = []  # what A wrote after the release, in order

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        if self.release.is_set() and "INSERT INTO usage_windows" in sql:
            self.late.append("usage_windows")
        self.inner.command(sql, params)

    def command_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> None:
        if self.release.is_set() and (table := _inserted(sql)) is not None:
            self.late.append(table)
        self.inner.command_with(sql, inputs, params)

    def insert_columns(self, table: str, columns: Mapping[str, pa.Array], token: str = "") -> None:
        if self.armed.is_set() and table == self.table and not self.entered.is_set():
            self.entered.set()
            if not self.release.wait(180):
                raise AssertionError("the stalled write was never released")
        if self.release.is_set():
            self.late.append(table)
            token = ""
        self.inner.insert_columns(table, columns, token)


def _inserted(sql: str) -> str | None:
    found = re.match(r"\s*INSERT\s+INTO\s+(\w+)", sql)
    return found.group(1) if found else None


def state_rows(store: Backend, group: str, topic: str) -> list[tuple[int, int, int, int, int, int]]:
    """Every ingest_state row: (partition, start, end, rank, attempt, epoch)."""
    rows = store.query(
        """SELECT partition, range_start, range_end, state_rank, attempt, epoch
           FROM ingest_state WHERE group_id = {g:String} AND topic = {t:String}""",
        {"g": group, "t": topic},
    )
    return [(int(p), int(s), int(e), int(r), int(a), int(ep)) for p, s, e, r, a, ep in rows]


def latest_epochs(store: Backend, group: str, topic: str) -> dict[int, int]:
    """Whose row the fenced read picks per partition: the epoch of load_states' winner."""
    latest = load_states(store, group, topic, list(PARTITIONS))
    rows = state_rows(store, group, topic)
    out = {}
    for p, st in latest.items():
        owners = {
            ep
            for (q, s, e, r, _, ep) in rows
            if (q, s, e, r) == (p, st.range_start, st.range_end, st.rank)
        }
        assert len(owners) == 1, f"partition {p}: {st} written by several epochs {owners}"
        out[p] = owners.pop()
    return out


def force_group_offsets(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    """Rewind the group's committed offsets: what a zombie commit would leave behind on a
    broker that did not fence it. The commit comes from a member of the group: a commit from
    outside it is refused while the group still lists a member, and Tansu drops a member
    that went silent only when another member joins, heartbeats or leaves, so retrying such
    a commit could wait forever."""
    owned: set[int] = set()

    def on_assign(_: Consumer, parts: list[TopicPartition]) -> None:
        owned.update(tp.partition for tp in parts)  # incremental: cooperative-sticky

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "partition.assignment.strategy": "cooperative-sticky",  # as the pipeline's
            **KAFKA["consumer_librdkafka"],
        }
    )
    try:
        c.subscribe([topic], on_assign=on_assign)
        deadline = time.monotonic() + 60
        while owned != set(offsets):
            assert time.monotonic() < deadline, f"never assigned all of {topic} in {group}"
            c.poll(0.2)
        c.commit(
            offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False
        )
    finally:
        c.close()


@pytest.mark.parametrize(
    "stalled_table",
    [
        pytest.param("usage_events", id="stalls-in-ledger-write"),
        pytest.param("ingest_state", id="stalls-before-its-intent-lands"),
    ],
)
def test_zombie_write_after_takeover_changes_nothing(
    broker: TansuBroker,
    emulator: EmulatorServer,
    tmp_path: Path,
    unique: str,
    stalled_table: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="consumer.intent.commit")
    zombie_cfg = make_settings(
        broker, emulator, tmp_path, unique, kafka=KAFKA, stripe={"enabled": False}
    )
    owner_cfg = make_settings(broker, emulator, tmp_path, unique, kafka=KAFKA)
    k = owner_cfg.kafka
    broker.create_topics({k.topic: len(PARTITIONS), k.dlq_topic: 1, k.late_topic: 1})
    prefix = f"cus_{unique}_"
    sample = generate(
        5_000, 6, len(PARTITIONS), int(time.time() * 1000), 41, customer_prefix=prefix
    )
    n = len(sample.messages)
    cuts = [0, n * 2 // 5, n * 3 // 5, n * 4 // 5, n]
    waves = [sample.messages[a:b] for a, b in itertools.pairwise(cuts)]
    ends: dict[int, int] = {}

    def produce(wave: list[Message]) -> dict[int, int]:
        for p, e in produce_messages(wave, broker.bootstrap, k.topic).items():
            ends[p] = max(ends.get(p, 0), e)
        assert set(ends) == set(PARTITIONS)
        return dict(ends)

    def all_committed(p: Pipeline, upto: dict[int, int]) -> bool:
        return all(p.ingestor.committed.get(q, -1) >= e for q, e in upto.items())

    store = open_store(owner_cfg.clickhouse)
    stall = Stall(store, stalled_table)
    clock = SystemClock()
    a = build_pipeline(zombie_cfg, clock, Metrics(), Health(clock), stall)
    # A stands for an instance of another process (as a zombie on a ClickHouse server
    # would be): its own ledger lock, so B goes on while A is stalled inside its write.
    # Instances of one process take turns on the ledger (test_concurrent_copies.py).
    a.ingestor.ctx.ledger_lock = threading.Lock()
    a_errors: list[BaseException] = []
    stop_a, woke, carry_on = threading.Event(), threading.Event(), threading.Event()

    def zombie() -> None:
        """A's poll loop (as Pipeline.run), halted once after its stale step so the test can
        look at the store before A polls again."""
        try:
            while not stop_a.is_set():
                a.ingestor.step()
                if stall.release.is_set() and not woke.is_set():
                    woke.set()
                    carry_on.wait(120)
        except BaseException as exc:
            a_errors.append(exc)
        finally:
            a.close()

    a_thread = threading.Thread(target=zombie, name="zombie-A")
    stop_b = threading.Event()
    b_thread: threading.Thread | None = None
    try:
        first = produce(waves[0])
        a_thread.start()
        wait_for(lambda: all_committed(a, first), "A commits the first wave", 60)
        assert set(a.ingestor.tracks) == set(PARTITIONS)

        stall.armed.set()
        produce(waves[1])
        wait_for(stall.entered.is_set, f"A stalls on its insert into {stalled_table}", 60)
        stalled_at = time.monotonic()
        at_stall = load_states(store, k.group_id, k.topic, list(PARTITIONS))
        open_ranges = {p: st for p, st in at_stall.items() if st.open}
        if stalled_table == "usage_events":
            assert open_ranges, f"A's intent should be open while it stalls: {at_stall}"
        else:
            assert not open_ranges, "A stalled before its intent: nothing is open yet"

        b = build_pipeline(owner_cfg, clock, Metrics(), Health(clock), store)  # joins now
        b_thread = threading.Thread(target=b.run, args=(stop_b,), name="owner-B")
        b_thread.start()
        wait_for(lambda: set(b.ingestor.tracks) == set(PARTITIONS), "B takes A's partitions", 60)
        assert time.monotonic() - stalled_at >= POLL_MS / 1000 - 1, "B got them before eviction"
        third = produce(waves[2])
        wait_for(lambda: all_committed(b, third), "B re-forms and moves on", 60)

        # B re-formed A's open range from its intent: same bounds, the next attempt.
        a_epoch, b_epoch = a.ingestor.ctx.commits.epoch, b.ingestor.ctx.commits.epoch
        rows = state_rows(store, k.group_id, k.topic)
        for p, st in open_ranges.items():
            for rank in (INTENT, DONE):
                assert (p, st.range_start, st.range_end, rank, st.attempt + 1, b_epoch) in rows
        assert counter_total(b.metrics.ranges_reformed) >= len(open_ranges)
        before = load_states(store, k.group_id, k.topic, list(PARTITIONS))
        assert {p: (s.rank, s.range_end) for p, s in before.items()} == {
            p: (DONE, e) for p, e in third.items()
        }
        assert latest_epochs(store, k.group_id, k.topic) == dict.fromkeys(PARTITIONS, b_epoch)
        assert group_committed(broker.bootstrap, k.group_id, k.topic, PARTITIONS) == third

        # A wakes up: finishes its stale write, its done row, its Kafka commit.
        stall.release.set()
        wait_for(woke.is_set, "A finishes its stale step", 60)
        assert not a_errors, a_errors
        # its window job runs on A's rollup thread, behind the step: until it has run
        wait_for(lambda: a.rollup.behind == 0, "A's rollup runs its stale job", 60)
        stale = {
            (p, s, e)
            for (p, s, e, r, _, ep) in state_rows(store, k.group_id, k.topic)
            if ep == a_epoch and r == DONE and s >= first[p]
        }
        assert stale, "A's stale range should have completed with a done row"
        assert {"usage_events", "usage_windows", "ingest_state"} <= set(stall.late)
        for p, _, e in stale:
            assert e <= third[p]
            assert a.ingestor.committed[p] == e  # what A believes it committed
        # Fencing: A's late rows (its intent too, in the second variant) hide nothing.
        assert load_states(store, k.group_id, k.topic, list(PARTITIONS)) == before
        assert latest_epochs(store, k.group_id, k.topic) == dict.fromkeys(PARTITIONS, b_epoch)
        # The broker refused A's commit (it is no longer a member): offsets did not go back.
        assert group_committed(broker.bootstrap, k.group_id, k.topic, PARTITIONS) == third
        refused = [r.getMessage() for r in caplog.records if r.name == "consumer.intent.commit"]
        assert any("Kafka commit failed" in m for m in refused), refused

        # A polls again, learns it lost its partitions, rejoins, and is stopped. It is stopped
        # only once its rejoin is complete: Tansu (0.6) keeps a member that leaves while its
        # group is forming as the group's leader, and that group never forms again (every later
        # join ends in REBALANCE_IN_PROGRESS), which stalled the rest of this test at random.
        carry_on.set()
        wait_for(
            lambda: (
                any("evicted from the group" in r.getMessage() for r in caplog.records)
                or not a_thread.is_alive()
            ),
            "A learns it was evicted",
        )
        wait_for(lambda: bool(a.ingestor.tracks) or not a_thread.is_alive(), "A rejoins", 60)
        stop_a.set()
        a_thread.join(60)
        assert not a_thread.is_alive()

        last = produce(waves[3])
        wait_for(lambda: set(b.ingestor.tracks) == set(PARTITIONS), "B owns every partition")
        wait_for(lambda: all_committed(b, last), "B commits everything", 60)
        wait_outbox_drained(b)
    finally:
        stall.release.set()
        carry_on.set()
        stop_a.set()
        stop_b.set()
        if a_thread.ident is not None:
            a_thread.join(60)
        if b_thread is not None:
            b_thread.join(60)

    try:
        meters = owner_cfg.meters
        assert ours(clickhouse_totals(store, meters), prefix) == sample.truth
        assert ledger_totals(store, meters, prefix) == sample.truth
        assert clickhouse_hourly(store, meters, prefix) == sample.truth_hourly
        final = load_states(store, k.group_id, k.topic, list(PARTITIONS))
        assert {p: (s.rank, s.range_end) for p, s in final.items()} == {
            p: (DONE, e) for p, e in last.items()
        }
        assert latest_epochs(store, k.group_id, k.topic) == dict.fromkeys(PARTITIONS, b_epoch)

        # Even had a broker taken A's stale commit, the next owner resumes from ingest_state.
        rewound = {**first, **{p: e for p, _, e in stale}}
        force_group_offsets(broker.bootstrap, k.group_id, k.topic, rewound)
        assert group_committed(broker.bootstrap, k.group_id, k.topic, PARTITIONS) == rewound
        quiet = make_settings(
            broker, emulator, tmp_path, unique, kafka=KAFKA, stripe={"enabled": False}
        )
        c = build_pipeline(quiet, clock, Metrics(), Health(clock), store)
        stop_c = threading.Event()
        c_thread = threading.Thread(target=c.run, args=(stop_c,), name="next-owner-C")
        c_thread.start()
        try:
            wait_for(lambda: set(c.ingestor.tracks) == set(PARTITIONS), "C owns every partition")
            wait_for(
                lambda: group_committed(broker.bootstrap, k.group_id, k.topic, PARTITIONS) == last,
                "C brings Kafka's offsets level with ingest_state",
                30,
            )
            time.sleep(1)
            resumed = {p: t.next_offset for p, t in c.ingestor.tracks.items()}
        finally:
            stop_c.set()
            c_thread.join(60)
        assert resumed == last
        assert counter_total(c.metrics.events_consumed) == 0  # nothing re-read from Kafka
        assert counter_total(c.metrics.ranges_committed) == 0
    finally:
        store.close()
    assert ours(stripe_totals(owner_cfg, emulator.url), prefix) == sample.truth
    assert stripe_hourly(emulator.url, owner_cfg.meters, prefix) == sample.truth_hourly
    # Last: A must have left cleanly (its poll loop ended without an exception).
    assert not a_errors, f"zombie A's poll loop raised: {a_errors!r}"
