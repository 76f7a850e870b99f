"""Window stage: event-time watermarks, lateness, and the aggregations windows hold.

ClickHouse recomputes the minute windows from the ledger (set semantics, P3); the small
aggregation classes here define the same results in Python, as the reference the
property tests hold ClickHouse and the demo's ground truth to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from consumer.exact import EXACT, truncated_mean

MINUTE_MS = 60_000


def minute_of(ts_ms: int) -> int:
    """Start of the minute window (epoch ms) holding `ts_ms`."""
    return ts_ms - ts_ms % MINUTE_MS


@dataclass(frozen=True, slots=True)
class Point:
    """One accepted event as windows see it; (time, event id) orders first/last ties."""

    time_ms: int
    event_id: str
    value: Decimal


class Aggregation(Protocol):
    def add(self, p: Point) -> None: ...

    def result(self) -> Decimal | None: ...


class Sum:
    def __init__(self) -> None:
        self.total = Decimal(0)

    def add(self, p: Point) -> None:
        self.total = EXACT.add(self.total, p.value)

    def result(self) -> Decimal | None:
        return self.total


class Count:
    def __init__(self) -> None:
        self.n = 0

    def add(self, p: Point) -> None:
        self.n += 1

    def result(self) -> Decimal | None:
        return Decimal(self.n)


class Min:
    def __init__(self) -> None:
        self.v: Decimal | None = None

    def add(self, p: Point) -> None:
        self.v = p.value if self.v is None else min(self.v, p.value)

    def result(self) -> Decimal | None:
        return self.v


class Max:
    def __init__(self) -> None:
        self.v: Decimal | None = None

    def add(self, p: Point) -> None:
        self.v = p.value if self.v is None else max(self.v, p.value)

    def result(self) -> Decimal | None:
        return self.v


class Last:
    def __init__(self) -> None:
        self.best: Point | None = None

    def add(self, p: Point) -> None:
        if self.best is None or (p.time_ms, p.event_id) > (self.best.time_ms, self.best.event_id):
            self.best = p

    def result(self) -> Decimal | None:
        return None if self.best is None else self.best.value


class First:
    def __init__(self) -> None:
        self.best: Point | None = None

    def add(self, p: Point) -> None:
        if self.best is None or (p.time_ms, p.event_id) < (self.best.time_ms, self.best.event_id):
            self.best = p

    def result(self) -> Decimal | None:
        return None if self.best is None else self.best.value


class Avg:
    """Exact to the ledger's 9 decimal places, truncated like ClickHouse's Decimal division."""

    def __init__(self) -> None:
        self.sum, self.n = Sum(), Count()

    def add(self, p: Point) -> None:
        self.sum.add(p)
        self.n.add(p)

    def result(self) -> Decimal | None:
        if self.n.n == 0:
            return None
        return truncated_mean(self.sum.total, self.n.n)


AGGREGATIONS: dict[str, type[Aggregation]] = {
    "sum": Sum,
    "count": Count,
    "min": Min,
    "max": Max,
    "last": Last,
    "first": First,
    "avg": Avg,
}


def aggregate(kind: str, points: Iterable[Point]) -> Decimal | None:
    agg = AGGREGATIONS[kind]()
    for p in points:
        agg.add(p)
    return agg.result()


class Watermarks:
    """Highest accepted event time per meter for one partition; lateness is measured from it.

    Kept per (partition, meter) and snapshotted in each range intent, so a re-formed range
    classifies every event exactly as the first attempt did (P1).
    """

    def __init__(self, initial: dict[str, int] | None = None) -> None:
        self.by_meter: dict[str, int] = dict(initial or {})

    def is_late(self, meter: str, ts_ms: int, allowed_lateness_ms: int) -> bool:
        mark = self.by_meter.get(meter)
        return mark is not None and ts_ms < mark - allowed_lateness_ms

    def observe(self, meter: str, ts_ms: int) -> None:
        if ts_ms > self.by_meter.get(meter, ts_ms - 1):
            self.by_meter[meter] = ts_ms

    def get(self, meter: str) -> int | None:
        return self.by_meter.get(meter)

    def copy(self) -> Watermarks:
        return Watermarks(self.by_meter)
