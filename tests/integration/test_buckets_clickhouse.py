"""Aggregated buckets in ClickHouse: cut at billing-period anchors exactly as buckets.py
says, and planning refused when the bucketing changed under existing pushes."""

from __future__ import annotations

import random
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from consumer.config import ClickHouseConfig, MeterConfig
from consumer.emitter.plan import outbox
from consumer.emitter.plan.buckets import bucket_of, bucket_sql
from consumer.emitter.plan.outbox import BucketingChanged
from consumer.store import open_store
from consumer.store.backend import Backend
from consumer.store.migrations import migrate
from tests.integration.test_stripe_delivery import insert_window

pytestmark = pytest.mark.integration
HOUR_MS, MINUTE_MS = 3_600_000, 60_000
T0 = 1_780_000_000_000 // HOUR_MS * HOUR_MS  # an hour boundary in 2026


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Backend]:
    s = open_store(ClickHouseConfig(chdb_path=tmp_path / "chdb"))
    migrate(s)
    yield s
    s.close()


def meter(window_seconds: int) -> MeterConfig:
    return MeterConfig(
        name="api_calls",
        event_name="api_call",
        stripe_event_name="api_calls",
        window_seconds=window_seconds,
    )


def minute_window(store: Backend, customer: str, at_ms: int, value: int) -> None:
    insert_window(store, customer, at_ms, Decimal(value))


def test_clickhouse_cuts_buckets_where_buckets_py_does(store: Backend) -> None:
    rng = random.Random(3)
    cuts = sorted(T0 + rng.randrange(0, 48 * 60) * MINUTE_MS for _ in range(6))
    times = [T0 + rng.randrange(0, 48 * 3600) * 1000 for _ in range(200)] + cuts
    start, end = bucket_sql("t")
    for window in (60, 900, 3600, 86400):
        rows = store.query(
            f"""SELECT toUnixTimestamp64Milli({start}), toUnixTimestamp64Milli({end})
                FROM (SELECT arrayJoin({{ts:Array(DateTime('UTC'))}}) AS t)""",
            {"ts": [t // 1000 for t in times], "sec": window, "anchors": cuts},
        )
        want = [bucket_of(t // 1000 * 1000, window, cuts) for t in times]
        assert [(int(a), int(b)) for a, b in rows] == want


def test_the_planner_cuts_an_hour_bucket_at_a_period_anchor(store: Backend) -> None:
    anchor = T0 + 30 * MINUTE_MS
    for m in (10, 29, 30, 59):
        minute_window(store, "cus_a", T0 + m * MINUTE_MS, 1)
    planned = outbox.plan_aggregated(store, meter(3600), T0 - HOUR_MS, [anchor])
    got = sorted((p.bucket_ms, p.bucket_end_ms, p.value) for p in planned)
    assert got == [(T0, anchor, Decimal(2)), (anchor, T0 + HOUR_MS, Decimal(2))]
    # without the anchor the hour is one bucket (on a store with nothing planned yet)
    whole = outbox.plan_aggregated(store, meter(3600), T0 - HOUR_MS)
    assert [(p.bucket_ms, p.value) for p in whole] == [(T0, Decimal(4))]


def test_planning_stops_when_the_bucketing_changed_under_existing_pushes(store: Backend) -> None:
    for m in (5, 40):
        minute_window(store, "cus_a", T0 + m * MINUTE_MS, 3)
    planned = outbox.plan_aggregated(store, meter(3600), T0 - HOUR_MS)
    outbox.write(store, planned, outbox.PENDING, T0)
    assert outbox.plan_aggregated(store, meter(3600), T0 - HOUR_MS) == []  # nothing moved
    # one-minute buckets would plan minute 40 again, though the hour's push holds it
    with pytest.raises(BucketingChanged, match="bill those minutes twice"):
        outbox.plan_aggregated(store, meter(60), T0 - HOUR_MS)
    with pytest.raises(BucketingChanged):
        outbox.plan_aggregated(store, meter(3600), T0 - HOUR_MS, [T0 + 20 * MINUTE_MS])
    # the check is what refuses (an emitter runs it once per meter and process): without
    # it both minutes would be planned again, though the hour's push holds them
    again = outbox.plan_aggregated(store, meter(60), T0 - HOUR_MS, check=False)
    assert [(p.bucket_ms, p.value) for p in again] == [
        (T0 + 5 * MINUTE_MS, Decimal(3)),
        (T0 + 40 * MINUTE_MS, Decimal(3)),
    ]
