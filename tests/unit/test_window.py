from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from tests.support.window import AGGREGATIONS, Point, Watermarks, aggregate, minute_of

values = st.decimals(min_value=0, max_value=10**12, places=9, allow_nan=False)
points = st.lists(
    st.builds(Point, st.integers(0, 10**7), st.text("abcdef", min_size=1, max_size=4), values),
    min_size=1,
    max_size=60,
    unique_by=lambda p: p.event_id,  # the ledger holds one row per event id
)


def brute(kind: str, ps: list[Point]) -> Decimal:
    ordered = sorted(ps, key=lambda p: (p.time_ms, p.event_id))
    vs = [p.value for p in ps]
    return {
        "sum": sum(vs, Decimal(0)),
        "count": Decimal(len(vs)),
        "min": min(vs),
        "max": max(vs),
        "first": ordered[0].value,
        "last": ordered[-1].value,
        "avg": (sum(vs, Decimal(0)) / len(vs)).quantize(Decimal("1e-9"), "ROUND_DOWN"),
    }[kind]


@given(points, st.randoms())
def test_every_aggregation_matches_brute_force_in_any_order(ps: list[Point], rnd: object) -> None:
    shuffled = list(ps)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    for kind in AGGREGATIONS:
        assert aggregate(kind, shuffled) == brute(kind, ps), kind


@given(st.lists(values, min_size=1, max_size=200))
def test_sums_are_exact(vs: list[Decimal]) -> None:
    ps = [Point(i, str(i), v) for i, v in enumerate(vs)]
    total = aggregate("sum", ps)
    assert total == sum(vs, Decimal(0))
    assert total is not None and int(total.as_tuple().exponent) >= -9


def test_a_million_tenths_sum_to_exactly_100000() -> None:
    ps = (Point(i, "e", Decimal("0.1")) for i in range(1_000_000))
    assert aggregate("sum", ps) == Decimal(100_000)


@given(st.integers(0, 10**13))
def test_minute_of(ts: int) -> None:
    m = minute_of(ts)
    assert m % 60_000 == 0 and m <= ts < m + 60_000


@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=100), st.integers(0, 10**6))
def test_watermark_is_max_seen_and_lateness_is_relative(ts: list[int], lateness: int) -> None:
    w = Watermarks()
    for t in ts:
        w.observe("m", t)
    assert w.get("m") == max(ts)
    assert w.is_late("m", max(ts) - lateness - 1, lateness)
    assert not w.is_late("m", max(ts) - lateness, lateness)
    assert not w.is_late("other", 0, lateness)
