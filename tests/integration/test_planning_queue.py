"""The planning queue (migration 21): an emitter cycle plans the buckets named since it last
planned, reads only those buckets' windows and pushes, and finds what the whole read finds.

The oracle is a Python model of the windows and of the outbox's newest ranks; it shares no
SQL with outbox.bucket_deltas."""

from __future__ import annotations

import os
import random
from decimal import Decimal

import pytest

from consumer.config import MeterConfig
from consumer.emitter.plan import outbox, queue
from consumer.emitter.plan.buckets import bucket_of
from consumer.emitter.plan.identifiers import aggregated_identifier
from consumer.emitter.plan.outbox import CANCELLED, PENDING, REJECTED, SENT, Push
from consumer.store.backend import Backend
from tests.integration.test_buckets_clickhouse import store as store  # a fixture
from tests.integration.test_stripe_delivery import insert_window

pytestmark = pytest.mark.integration
HOUR_MS, MINUTE_MS, DAY_MS = 3_600_000, 60_000, 86_400_000
T0 = 1_780_000_000_000 // HOUR_MS * HOUR_MS  # an hour boundary in 2026
METER = MeterConfig(
    name="api_calls", event_name="api_call", stripe_event_name="api_calls", window_seconds=3600
)
Key = tuple[str, int]


def push(customer: str, bucket_ms: int, rev: int, value: Decimal) -> Push:
    ident = aggregated_identifier(METER.name, customer, bucket_ms, rev)
    return Push(
        ident, "aggregated", METER.name, "api_calls", customer, bucket_ms, rev, value, 0,
        bucket_end_ms=bucket_ms + HOUR_MS,
    )  # fmt: skip


def test_named_buckets_find_what_the_whole_read_finds(store: Backend) -> None:
    seed = int(os.environ.get("TEST_SEED") or random.SystemRandom().randrange(10**6))
    print(f"seed={seed} (replay: TEST_SEED={seed})")
    rng = random.Random(seed)
    cuts = [T0 + 7 * HOUR_MS + 30 * MINUTE_MS]  # a period anchor inside an hour
    since = T0 + 2 * HOUR_MS + 20 * MINUTE_MS  # inside a bucket: it straddles the lookback
    totals: dict[Key, Decimal] = {}
    minutes = {(f"cus_{rng.randrange(6)}", T0 + rng.randrange(720) * MINUTE_MS) for _ in range(150)}
    for c, at in sorted(minutes):  # one window row per (customer, minute)
        v = Decimal(rng.randrange(1, 50))
        insert_window(store, c, at, v)
        if at >= since:
            b = bucket_of(at, 3600, cuts)[0]
            totals[c, b] = totals.get((c, b), Decimal(0)) + v
    # Pushes of most buckets, some of buckets before the lookback: revisions, each written
    # at several ranks (every version stays unmerged), some cancelled or held.
    pushed: dict[Key, Decimal] = {}
    revs: dict[Key, int] = {}
    buckets = sorted({bucket_of(T0 + h * HOUR_MS, 3600, cuts)[0] for h in range(13)} | set(cuts))
    for c in (f"cus_{i}" for i in range(6)):
        for b in buckets:
            for rev in range(1, rng.randrange(1, 4)):
                p = push(c, b, rev, Decimal(rng.randrange(1, 40)))
                last = rng.choice([PENDING, SENT, CANCELLED, REJECTED])
                for rank in sorted({PENDING, last}):
                    outbox.write(store, [p], rank, T0)
                pushed.setdefault((c, b), Decimal(0))
                pushed[c, b] += p.value if last != CANCELLED else 0
                revs[c, b] = rev

    def expected(keys: set[Key] | None, grew: bool) -> list[tuple[str, int, Decimal, int]]:
        out = []
        for (c, b), total in totals.items():
            d = total - pushed.get((c, b), Decimal(0))
            if (keys is None or (c, b) in keys) and (d > 0 if grew else d < 0):
                out.append((c, b, d, revs.get((c, b), 0)))
        return sorted(out, key=lambda r: (r[1], r[0]))

    def found(keys: set[Key] | None, grew: bool) -> list[tuple[str, int, Decimal, int]]:
        where = "w.total > p.pushed" if grew else "w.total < p.pushed"
        named = None if keys is None else sorted(keys)
        rows = outbox.bucket_deltas(store, METER, since, cuts, where, False, named)
        return [(c, b, d, r) for c, b, _, d, r in rows]

    every = set(totals) | set(pushed)
    for grew in (True, False):
        assert found(None, grew) == expected(None, grew)
        assert found(every, grew) == expected(None, grew)
        some = {k for k in every if rng.random() < 0.4} | {("cus_none", T0)}
        assert found(some, grew) == expected(some, grew)
    assert found(set(), True) == []
    # Planned by difference: planning the named buckets again after writing finds nothing.
    planned = outbox.plan_aggregated(store, METER, since, cuts, False, sorted(every))
    assert [(p.customer_id, p.bucket_ms, p.value) for p in planned] == [
        (c, b, d) for c, b, d, _ in expected(None, True)
    ]
    outbox.write(store, planned, PENDING, T0)
    assert outbox.plan_aggregated(store, METER, since, cuts, False, sorted(every)) == []


def test_a_named_bucket_reads_its_rows_not_the_history(store: Backend) -> None:
    """60 days of hourly windows and sent pushes for 500 customers (720,000 of each): a
    cycle's read of a few named buckets stays under ClickHouse's max_rows_to_read, where
    the whole lookback's read is refused."""
    customers, hours = 500, 60 * 24
    now = T0 + hours * HOUR_MS
    store.command(
        """INSERT INTO usage_windows (meter, customer_id, window_start, sum_value,
                                      event_count, computed_at)
           SELECT 'api_calls', toString(number % {c:UInt32}),
                  toDateTime(intDiv({t:Int64}, 1000) + intDiv(number, {c:UInt32}) * 3600, 'UTC'),
                  1, 1, now64(9)
           FROM numbers({n:UInt64})""",
        {"c": customers, "t": T0, "n": customers * hours},
    )
    store.command(
        """INSERT INTO stripe_pushes (identifier, mode, meter, stripe_event_name, customer_id,
                                      bucket_start, revision, value, status_rank)
           SELECT concat('uc1a_', toString(number)), 'aggregated', 'api_calls', 'api_calls',
                  toString(number % {c:UInt32}),
                  fromUnixTimestamp64Milli({t:Int64} + intDiv(number, {c:UInt32}) * 3600000,
                                           'UTC'),
                  1, 1, {sent:UInt8}
           FROM numbers({n:UInt64})""",
        {"c": customers, "t": T0, "n": customers * hours, "sent": SENT},
    )
    store.command("OPTIMIZE TABLE usage_windows FINAL")
    store.command("OPTIMIZE TABLE stripe_pushes FINAL")
    insert_window(store, "7", now - HOUR_MS + 5 * MINUTE_MS, Decimal(5))  # one bucket grew
    since = now - 35 * DAY_MS
    named = [("7", now - HOUR_MS), ("8", now - 2 * HOUR_MS), ("9", now - 30 * DAY_MS)]
    store.command("SET max_rows_to_read = 100000")
    try:
        rows = outbox.bucket_deltas(store, METER, since, [], "w.total > p.pushed", False, named)
        assert [(c, b, d) for c, b, _, d, _ in rows] == [("7", now - HOUR_MS, Decimal(5))]
        with pytest.raises(Exception, match=r"TOO_MANY_ROWS|[Ll]imit for rows"):
            outbox.bucket_deltas(store, METER, since, [], "w.total > p.pushed", False)
    finally:
        store.command("SET max_rows_to_read = 0")


def test_a_name_written_again_while_planning_stays_to_plan(store: Backend) -> None:
    first = queue.take(store)
    assert first.everything  # migration 21's name: one whole read after it
    queue.planned(store, first)
    assert queue.take(store).names == ()
    queue.name(store, [("api_calls", "cus_a", T0), ("api_calls", "cus_b", T0 + 90_000)])
    taken = queue.take(store)
    assert not taken.everything
    # a bucket cut inside a minute is named by its first whole minute, which it holds
    assert [(c, w) for _, c, w, _ in taken.names] == [("cus_a", T0), ("cus_b", T0 + 120_000)]
    assert taken.buckets(METER, [T0 + 90_000], T0) == [("cus_a", T0), ("cus_b", T0 + 90_000)]
    queue.name(store, [("api_calls", "cus_b", T0 + 120_000)])  # the rollup, meanwhile
    queue.planned(store, taken)
    assert [(c, w) for _, c, w, _ in queue.take(store).names] == [("cus_b", T0 + 120_000)]
    queue.tidy(store, at=1)  # cus_a's name is planned: deleted; cus_b's waits
    assert store.query("SELECT DISTINCT customer_id FROM planning_queue") == [("cus_b",)]
    # A crash before the record: the same names are taken again.
    again = queue.take(store)
    assert queue.take(store) == again
    queue.planned(store, again)
    queue.tidy(store, at=1)
    assert store.query("SELECT count() FROM planning_queue") == [(0,)]


def test_every_recompute_names_its_windows(store: Backend) -> None:
    import pyarrow as pa

    from consumer.sinks.rollup import recompute

    store.command("TRUNCATE TABLE planning_queue")
    store.command(
        """INSERT INTO usage_events (meter, customer_id, event_id, event_time, value, topic,
                                     partition, offset, record_time, ver)
           VALUES ('api_calls', 'cus_a', 'e1', fromUnixTimestamp64Milli({t:Int64}, 'UTC'), 2,
                   't', 0, 1, now64(3), 1)""",
        {"t": T0 + 5_000},
    )
    windows = pa.table(
        {
            "meter": pa.array(["api_calls", "api_calls"]),
            "customer_id": pa.array(["cus_a", "cus_b"]),  # cus_b's: none in the ledger
            "window_start": pa.array([T0 // 1000] * 2, pa.timestamp("s", tz="UTC")),
        }
    )
    recompute(store, windows)
    names = queue.take(store).names
    assert sorted((m, c, w) for m, c, w, _ in names) == [
        ("api_calls", "cus_a", T0),
        ("api_calls", "cus_b", T0),
    ]
