"""The ClickHouse window SQL against the Python reference aggregations, on a real chDB store.

Events go through the sinks as the pipeline writes them (tests/support/writes.py:
`write_effects` then `recompute_windows`), including copies of the same events in a later
batch, and the analyst views must equal `tests.support.window.aggregate` over the
deduplicated events, digit for digit.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Context, Decimal, localcontext
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.classify.classifier import Accepted, Classified
from consumer.classify.snapshot import Snapshot
from consumer.config import MeterConfig
from consumer.decode.event import DecodedEvent
from consumer.ops.totals import aggregation_values
from consumer.records import Record
from consumer.sinks.ledger import (
    RangeWrite,
    accepted_table,
    batch_id,
    cancels_of,
)
from consumer.store.backend import Backend
from consumer.store.chdb import ChdbBackend
from consumer.store.migrations import migrate
from tests.support.window import MINUTE_MS, Point, aggregate, minute_of
from tests.support.writes import accepted_batch, recompute_windows, write_effects

pytestmark = pytest.mark.integration

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
# An hour boundary a couple of days back: recent, like the events the pipeline accepts.
BASE_MS = int(time.time() * 1000) // HOUR_MS * HOUR_MS - 2 * DAY_MS
METERS = {
    "api_calls": MeterConfig(name="api_calls", event_name="api_call", aggregation="sum"),
    "storage_gb": MeterConfig(name="storage_gb", event_name="storage_gb", aggregation="last"),
}
SNAPSHOT = Snapshot(watermarks={}, config_hash="test", stamp_ms=BASE_MS)
KINDS = ("sum", "count", "min", "max", "first", "last", "avg")
_topics = itertools.count(1)


@dataclass(frozen=True)
class Ev:
    meter: str
    customer: str
    event_id: str
    ts: int
    value: Decimal

    @property
    def identity(self) -> tuple[str, str, int, str]:
        """The ledger's sort key: (meter, customer, minute, event id)."""
        return (self.meter, self.customer, minute_of(self.ts), self.event_id)

    def point(self) -> Point:
        return Point(self.ts, self.event_id, self.value)


@dataclass(frozen=True)
class Copy:
    """One written copy of an event: where it came from in Kafka."""

    ev: Ev
    partition: int
    record_delay_ms: int


Key = tuple[str, str, int]
Row = dict[str, Decimal | None]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Backend]:
    backend = ChdbBackend(tmp_path / "chdb", "usage")
    try:
        migrate(backend)
        yield backend
    finally:
        backend.close()


def reset(store: Backend) -> None:
    for table in ("usage_events", "usage_windows", "cancellations"):
        store.command(f"TRUNCATE TABLE {table}")


# --- building what the pipeline writes ---------------------------------------------------


@dataclass(frozen=True)
class Cancel:
    """A cancel event: takes back `target` of its meter and customer."""

    meter: str
    customer: str
    target: str
    ts: int = BASE_MS


def ranges_for(
    copies: Sequence[Copy], topic: str, cancels: Sequence[Cancel] = ()
) -> list[RangeWrite]:
    """The copies as consecutive records, one range per partition, all accepted; the cancels
    in partition 9."""
    by_partition: dict[int, list[Copy]] = defaultdict(list)
    for c in copies:
        by_partition[c.partition].append(c)
    out = []
    for partition, group in sorted(by_partition.items()):
        accepted = []
        for offset, c in enumerate(group):
            ev = c.ev
            meter = METERS[ev.meter]
            event = DecodedEvent(
                ev.event_id, meter.event_name, ev.customer, ev.value, ev.ts, {"k": "v"}, 2
            )
            rec = Record(topic, partition, offset, None, b"", ev.ts + c.record_delay_ms)
            accepted.append(Accepted(rec, event, meter))
        classified = Classified(accepted=accepted_batch(accepted))
        out.append(RangeWrite(topic, partition, 0, len(group), 1, SNAPSHOT, classified))
    if cancels:
        taken = []
        for offset, x in enumerate(cancels):
            meter = METERS[x.meter]
            own_id = f"cancel-{x.target}"
            event = DecodedEvent(
                own_id, meter.event_name, x.customer, Decimal(0), x.ts, {}, 4, x.target
            )
            taken.append(Accepted(Record(topic, 9, offset, None, b"", x.ts), event, meter))
        classified = Classified(cancels=taken)
        out.append(RangeWrite(topic, 9, 0, len(cancels), 1, SNAPSHOT, classified))
    return out


def write_batch(store: Backend, ranges: Sequence[RangeWrite], now_ms: int, token: str = "") -> int:
    token = token or batch_id(ranges)
    n = write_effects(store, token, ranges, now_ms)
    recompute_windows(store, accepted_table(ranges), cancels_of(ranges))
    return n


# --- reading ClickHouse ------------------------------------------------------------------


def minutely(store: Backend) -> dict[Key, Row]:
    rows = store.query(
        """SELECT meter, customer_id, toInt64(toUnixTimestamp(window_start)) * 1000,
                  toString(sum_value), event_count, toString(min_value), toString(max_value),
                  toString(first_value), toString(last_value), toString(avg_value)
           FROM usage_minutely"""
    )
    out: dict[Key, Row] = {}
    for meter, customer, start, s, n, lo, hi, first, last, avg in rows:
        key = (str(meter), str(customer), int(start))
        assert key not in out, f"two rows for window {key}"
        out[key] = {**aggregation_values(s, n, lo, hi, first, last), "avg": Decimal(avg)}
    return out


def totals(store: Backend) -> dict[tuple[str, str], Row]:
    rows = store.query(
        """SELECT meter, customer_id, toString(sum_value), event_count, toString(min_value),
                  toString(max_value), toString(first_value), toString(last_value)
           FROM usage_totals"""
    )
    out: dict[tuple[str, str], Row] = {}
    for meter, customer, s, n, lo, hi, first, last in rows:
        values = aggregation_values(s, n, lo, hi, first, last)
        out[(str(meter), str(customer))] = {k: v for k, v in values.items() if k != "avg"}
    return out


def hourly(store: Backend) -> dict[Key, Row]:
    rows = store.query(
        """SELECT meter, customer_id, toInt64(toUnixTimestamp(hour)) * 1000,
                  toString(sum_value), event_count, toString(min_value), toString(max_value),
                  toString(first_value), toString(last_value)
           FROM usage_hourly"""
    )
    return {
        (str(m), str(c), int(h)): {
            k: v for k, v in aggregation_values(s, n, lo, hi, first, last).items() if k != "avg"
        }
        for m, c, h, s, n, lo, hi, first, last in rows
    }


def ledger_count(store: Backend) -> int:
    return int(store.query("SELECT count() FROM usage_events FINAL")[0][0])


# --- the Python reference ----------------------------------------------------------------


def unique(events: Sequence[Ev], cancels: Sequence[Cancel] = ()) -> list[Ev]:
    """The ledger's events, without the cancelled ones."""
    gone = {(x.meter, x.customer, x.target) for x in cancels}
    kept = (e for e in events if (e.meter, e.customer, e.event_id) not in gone)
    return list({e.identity: e for e in kept}.values())


def reference(
    events: Sequence[Ev], group: str, kinds: Sequence[str] = KINDS, cancels: Sequence[Cancel] = ()
) -> dict[tuple[str | int, ...], Row]:
    grouped: dict[tuple[str | int, ...], list[Point]] = defaultdict(list)
    for e in unique(events, cancels):
        if group == "minute":
            key: tuple[str | int, ...] = (e.meter, e.customer, minute_of(e.ts))
        elif group == "hour":
            key = (e.meter, e.customer, e.ts - e.ts % HOUR_MS)
        else:
            key = (e.meter, e.customer)
        grouped[key].append(e.point())
    return {k: {kind: aggregate(kind, ps) for kind in kinds} for k, ps in grouped.items()}


# --- strategies --------------------------------------------------------------------------

VALUES = st.one_of(
    st.decimals(min_value=0, max_value=10**12, places=9, allow_nan=False),
    st.sampled_from([Decimal(0), Decimal("0.1"), Decimal("1E+3"), Decimal("0.333333333")]),
)
TIMES = st.builds(
    lambda minute, ms: BASE_MS + minute * MINUTE_MS + ms,
    st.one_of(st.integers(0, 3), st.integers(55, 65), st.integers(0, 60 * 26)),
    st.sampled_from([0, 1, 500, 59_999]) | st.integers(0, 59_999),
)
EVENTS = st.lists(
    st.builds(
        Ev,
        st.sampled_from(sorted(METERS)),
        st.sampled_from(["cus_a", "cus_B", "cus_c"]),
        st.text("aAbZ09-_", min_size=1, max_size=5),
        TIMES,
        VALUES,
    ),
    min_size=1,
    max_size=40,
    unique_by=lambda e: (e.meter, e.customer, e.event_id),
)


@st.composite
def two_batches(draw: st.DrawFn) -> tuple[list[Ev], list[Copy], list[Copy]]:
    """Events spread over two batches in random orders: some only in the first, some only
    in the second, some copied into both (and sometimes twice into the second)."""
    events = draw(EVENTS)
    first: list[Copy] = []
    second: list[Copy] = []

    def copy(ev: Ev) -> Copy:
        return Copy(ev, draw(st.integers(0, 2)), draw(st.integers(0, 120_000)))

    for ev in events:
        where = draw(st.sampled_from(["first", "second", "both", "both_twice"]))
        if where != "second":
            first.append(copy(ev))
        if where != "first":
            second.append(copy(ev))
        if where == "both_twice":
            second.append(copy(ev))
    return events, list(draw(st.permutations(first))), list(draw(st.permutations(second)))


# --- tests -------------------------------------------------------------------------------


def assert_views_match(
    store: Backend, events: Sequence[Ev], cancels: Sequence[Cancel] = ()
) -> None:
    assert minutely(store) == reference(events, "minute", cancels=cancels)
    assert hourly(store) == reference(events, "hour", KINDS[:-1], cancels)
    assert totals(store) == reference(events, "total", KINDS[:-1], cancels)
    assert ledger_count(store) == len(unique(events))


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=two_batches())
def test_windows_and_totals_equal_the_python_reference(
    store: Backend, case: tuple[list[Ev], list[Copy], list[Copy]]
) -> None:
    events, first, second = case
    reset(store)
    topic = f"usage.events.{next(_topics)}"
    now = BASE_MS + 10 * HOUR_MS
    if first:
        write_batch(store, ranges_for(first, topic), now)
        assert_views_match(store, [c.ev for c in first])
    if second:
        write_batch(store, ranges_for(second, topic + ".b"), now + 1000)
    assert_views_match(store, events)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(events=EVENTS, data=st.data())
def test_writing_the_same_range_twice_converges(
    store: Backend, events: list[Ev], data: st.DataObject
) -> None:
    """P3: a retried range rewrites the same rows; with its dedup token, or without it
    (the token is only a fast path), and in another order, nothing changes."""
    reset(store)
    topic = f"usage.events.{next(_topics)}"
    copies = [Copy(e, 0, 10) for e in events]
    ranges = ranges_for(copies, topic)
    now = BASE_MS + 10 * HOUR_MS
    assert write_batch(store, ranges, now) == len(events)
    before = (totals(store), minutely(store), ledger_count(store))
    assert before[2] == len(events)

    write_batch(store, ranges, now)  # the same token: the fast path drops the inserts
    assert (totals(store), minutely(store), ledger_count(store)) == before

    shuffled = data.draw(st.permutations(copies))
    retry = ranges_for(shuffled, topic)
    write_batch(store, retry, now + 5000, token=batch_id(retry) + "-attempt2")
    assert (totals(store), minutely(store), ledger_count(store)) == before
    assert_views_match(store, events)


def test_ledger_keeps_the_copy_with_the_earliest_record_time(store: Backend) -> None:
    ev = Ev("api_calls", "cus_a", "e-1", BASE_MS + 5, Decimal("2.5"))
    write_batch(store, ranges_for([Copy(ev, 1, 500)], "t.late-copy"), BASE_MS)
    write_batch(store, ranges_for([Copy(ev, 2, 100)], "t.early-copy"), BASE_MS)
    write_batch(store, ranges_for([Copy(ev, 0, 900)], "t.later-copy"), BASE_MS)
    rows = store.query(
        """SELECT topic, partition, toUnixTimestamp64Milli(record_time), toString(value)
           FROM usage_events FINAL"""
    )
    assert rows == [("t.early-copy", 2, BASE_MS + 105, "2.5")]
    assert totals(store) == reference([ev], "total", KINDS[:-1])


def test_windows_of_other_customers_and_minutes_are_not_touched(store: Backend) -> None:
    a = Ev("api_calls", "cus_a", "e-1", BASE_MS + 1_000, Decimal("1"))
    b = Ev("api_calls", "cus_b", "e-2", BASE_MS + 61_000, Decimal("2"))
    server_now = "SELECT toUnixTimestamp64Nano(now64(9, 'UTC'))"
    started = int(store.query(server_now)[0][0])
    write_batch(store, ranges_for([Copy(a, 0, 0), Copy(b, 0, 0)], "t.one"), BASE_MS)
    ended = int(store.query(server_now)[0][0])
    computed = {
        str(customer): int(at)
        for customer, at in store.query(
            "SELECT customer_id, toUnixTimestamp64Nano(computed_at) FROM usage_windows"
        )
    }
    # one recompute, versioned by the server's clock as it read the ledger
    assert computed["cus_a"] == computed["cus_b"] and started <= computed["cus_a"] <= ended
    c = Ev("api_calls", "cus_a", "e-3", BASE_MS + 2_000, Decimal("4"))
    write_batch(store, ranges_for([Copy(c, 0, 0)], "t.two"), BASE_MS + 60_000)
    after = store.query(
        """SELECT customer_id, toUnixTimestamp64Nano(computed_at), toString(sum_value)
           FROM usage_windows FINAL ORDER BY customer_id"""
    )
    assert after[1] == ("cus_b", computed["cus_b"], "2")  # not recomputed
    assert after[0][0] == "cus_a" and after[0][2] == "5" and int(after[0][1]) > ended


def test_windows_are_computed_for_events_a_month_old(store: Backend) -> None:
    now_ms = int(time.time() * 1000)
    # Event 34 days before its record, which was produced 7 days ago (e.g. consumer lag).
    record_ts = now_ms - 7 * DAY_MS
    ev = Ev("api_calls", "cus_old", "e-old", record_ts - 34 * DAY_MS, Decimal("3"))
    ranges = ranges_for([Copy(ev, 0, 34 * DAY_MS)], "t.old")
    token = batch_id(ranges)
    write_effects(store, token, ranges, now_ms)
    recompute_windows(store, accepted_table(ranges))
    assert ledger_count(store) == 1
    assert totals(store) == reference([ev], "total", KINDS[:-1])


def test_reference_is_exact_for_sums_beyond_28_digits(store: Backend) -> None:
    big = Ev("api_calls", "cus_big", "e-1", BASE_MS + 1, Decimal(10**19))
    tiny = Ev("api_calls", "cus_big", "e-2", BASE_MS + 2, Decimal("0.000000001"))
    write_batch(store, ranges_for([Copy(big, 0, 0), Copy(tiny, 0, 0)], "t.big"), BASE_MS)
    window = minutely(store)[("api_calls", "cus_big", BASE_MS)]
    assert window["sum"] == Decimal("10000000000000000000.000000001")  # ClickHouse is exact
    assert minutely(store) == reference([big, tiny], "minute")


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    values=st.lists(
        st.decimals(min_value=0, max_value=10**19, places=9, allow_nan=False),
        min_size=1,
        max_size=40,
    ),
    spread=st.integers(0, 3),
)
def test_clickhouse_sums_are_exact_decimals(
    store: Backend, values: list[Decimal], spread: int
) -> None:
    # Checked against plain Decimal arithmetic, not the reference: what ClickHouse sums,
    # minute by minute and per hour, is every value's exact sum (no float, no rounding).
    reset(store)
    events = [
        Ev("api_calls", "cus_exact", f"x-{i}", BASE_MS + (i % (spread + 1)) * 60_000 + i, v)
        for i, v in enumerate(values)
    ]
    write_batch(
        store, ranges_for([Copy(e, 0, 0) for e in events], f"t.exact.{next(_topics)}"), BASE_MS
    )
    minutes = {k: r["sum"] for k, r in minutely(store).items() if k[1] == "cus_exact"}
    expected: dict[Key, Decimal] = defaultdict(Decimal)
    with localcontext(Context(prec=60)):  # Python's default 28 digits would round these
        for e in events:
            expected[("api_calls", "cus_exact", minute_of(e.ts))] += e.value
        total = sum(values, Decimal(0))
    assert minutes == dict(expected)
    assert hourly(store)[("api_calls", "cus_exact", BASE_MS)]["sum"] == total


def test_a_hundred_thousand_tenths_sum_to_exactly_ten_thousand_in_clickhouse(
    store: Backend,
) -> None:
    events = [Ev("api_calls", "cus_tenths", f"t-{i}", BASE_MS + i % 60_000, Decimal("0.1"))
              for i in range(100_000)]  # fmt: skip
    write_batch(store, ranges_for([Copy(e, 0, 0) for e in events], "t.tenths"), BASE_MS)
    assert hourly(store)[("api_calls", "cus_tenths", BASE_MS)]["sum"] == Decimal(10_000)


# --- cancellations -----------------------------------------------------------------------


@st.composite
def cancelled_batches(draw: st.DrawFn) -> tuple[list[Ev], list[list[Copy]], list[list[Cancel]]]:
    """Events and cancels spread over three batches in any order: a cancel may come before
    its original, after it, twice, name the wrong customer or an id that never comes."""
    events = draw(EVENTS)
    copies: list[list[Copy]] = [[], [], []]
    cancels: list[list[Cancel]] = [[], [], []]
    for ev in events:
        copies[draw(st.integers(0, 2))].append(Copy(ev, draw(st.integers(0, 2)), 0))
        what = draw(st.sampled_from(["keep", "keep", "cancel", "twice", "wrong_customer"]))
        if what == "keep":
            continue
        customer = "cus_other" if what == "wrong_customer" else ev.customer
        for _ in range(2 if what == "twice" else 1):
            cancels[draw(st.integers(0, 2))].append(Cancel(ev.meter, customer, ev.event_id))
    cancels[draw(st.integers(0, 2))].append(Cancel("api_calls", "cus_a", "never-comes"))
    return events, copies, cancels


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cancelled_batches())
def test_cancelled_events_leave_every_view_whatever_the_order(
    store: Backend, case: tuple[list[Ev], list[list[Copy]], list[list[Cancel]]]
) -> None:
    _, copies, cancels = case
    reset(store)
    topic = f"usage.events.{next(_topics)}"
    seen: list[Ev] = []
    taken: list[Cancel] = []
    for i in range(3):
        if copies[i] or cancels[i]:
            write_batch(store, ranges_for(copies[i], f"{topic}.{i}", cancels[i]), BASE_MS + i)
        seen += [c.ev for c in copies[i]]
        taken += cancels[i]
        assert_views_match(store, seen, taken)
    # A window emptied by cancels stays as a zero row that no view shows.
    zero = store.query("SELECT count() FROM usage_windows FINAL WHERE event_count = 0")
    emptied = {k[:3] for k in reference(seen, "minute")} - set(
        reference(seen, "minute", cancels=taken)
    )
    assert int(zero[0][0]) <= len(emptied)


def test_a_cancel_retried_after_its_original_arrived_elsewhere_still_applies(
    store: Backend,
) -> None:
    """The cancel's first attempt found no original; meanwhile another partition wrote it
    (and its recompute already saw the cancel). The retry recomputes its window again."""
    ev = Ev("api_calls", "cus_a", "e-1", BASE_MS + 5, Decimal("4"))
    other = Ev("api_calls", "cus_a", "e-2", BASE_MS + 6, Decimal("1"))
    cancel = ranges_for([], "t.cancel", [Cancel("api_calls", "cus_a", "e-1")])
    token = batch_id(cancel)
    write_batch(store, cancel, BASE_MS, token)
    write_batch(store, ranges_for([Copy(ev, 0, 0), Copy(other, 0, 0)], "t.orig"), BASE_MS)
    assert totals(store)[("api_calls", "cus_a")]["sum"] == Decimal(1)
    write_batch(store, cancel, BASE_MS + 1, token)  # the retry: same token, same rows
    assert totals(store)[("api_calls", "cus_a")]["sum"] == Decimal(1)
    assert int(store.query("SELECT count() FROM cancellations FINAL")[0][0]) == 1


def test_cancelling_every_event_of_a_window_zeroes_it(store: Backend) -> None:
    ev = Ev("api_calls", "cus_a", "e-1", BASE_MS + 5, Decimal("4"))
    write_batch(store, ranges_for([Copy(ev, 0, 0)], "t.one"), BASE_MS)
    assert minutely(store) == reference([ev], "minute")
    write_batch(store, ranges_for([], "t.two", [Cancel("api_calls", "cus_a", "e-1")]), BASE_MS)
    assert minutely(store) == {} and totals(store) == {} and hourly(store) == {}
    rows = store.query("SELECT toString(sum_value), event_count FROM usage_windows FINAL")
    assert rows == [("0", 0)]  # what the aggregated planner reads: the bucket fell to 0


def test_a_cancel_finds_its_original_without_reading_the_history(tmp_path: Path) -> None:
    """120 days of ledger, 1,000 events an hour, each hour one window. A cancel of this
    hour's event empties it out of its window reading only the hours near the cancel; one
    of an event 30 days older reads at most the 35-day reach. ClickHouse refuses to read
    more rows than allowed (max_rows_to_read), so a scan of the history fails the test."""
    store = ChdbBackend(tmp_path / "chdb", "usage")
    migrate(store)
    hours, per_hour, now = 120 * 24, 1_000, BASE_MS
    store.command(
        f"""INSERT INTO usage_events (meter, customer_id, event_id, event_time, value, topic,
                                      partition, offset, record_time, ver)
            SELECT 'api_calls', 'c', toString(number),
                   fromUnixTimestamp64Milli({now} - intDiv(number, {per_hour}) * {HOUR_MS},
                                            'UTC'), 1, 't', 1, number, now64(3), 1
            FROM numbers({hours * per_hour})"""
    )
    store.command("OPTIMIZE TABLE usage_events FINAL")
    month_ago = 30 * 24 * per_hour + 5  # an event of the hour 30 days back
    for target, at in (("5", now), (str(month_ago), now)):
        store.command(
            """INSERT INTO cancellations (meter, customer_id, cancelled_id, event_id, event_time,
                                          topic, partition, offset, record_time)
               VALUES ('api_calls', 'c', {t:String}, {e:String},
                       fromUnixTimestamp64Milli({at:Int64}, 'UTC'), 't', 2, 0, now64(3))""",
            {"t": target, "e": f"cancel-{target}", "at": at},
        )
    empty = accepted_table([])

    def count(hours_back: int) -> int:
        (n,) = store.query(
            """SELECT event_count FROM usage_windows FINAL
               WHERE window_start = toDateTime({s:Int64}, 'UTC')""",
            {"s": (now - hours_back * HOUR_MS) // 1000},
        )[0]
        return int(n)

    near = 12 * per_hour + 10 * per_hour  # 12 h either side, and granule slack
    store.command(f"SET max_rows_to_read = {near}")
    recompute_windows(store, empty, [("api_calls", "c", "5", now)])
    assert count(0) == per_hour - 1
    store.command(f"SET max_rows_to_read = {(35 + 2) * 24 * per_hour}")
    recompute_windows(store, empty, [("api_calls", "c", str(month_ago), now)])
    assert count(30 * 24) == per_hour - 1
    store.command(f"SET max_rows_to_read = {near}")
    with pytest.raises(Exception, match=r"TOO_MANY_ROWS|[Ll]imit for rows"):
        recompute_windows(store, empty, [("api_calls", "c", str(month_ago), now)])
    store.close()
