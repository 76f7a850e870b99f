from hypothesis import given
from hypothesis import strategies as st

from consumer.dedup import HOUR_MS, RecentIds, id_hash


@given(st.lists(st.tuples(st.text(max_size=4), st.integers(0, 5 * HOUR_MS)), max_size=100))
def test_everything_added_within_the_window_is_found(items: list[tuple[str, int]]) -> None:
    r = RecentIds(window_ms=10 * HOUR_MS)
    for eid, ts in items:
        r.add(id_hash("m", eid), ts)
    for eid, _ in items:
        assert r.might_contain(id_hash("m", eid))


def test_meter_is_part_of_the_key() -> None:
    r = RecentIds(HOUR_MS)
    r.add(id_hash("a", "x"), 0)
    assert not r.might_contain(id_hash("b", "x"))


def test_old_hours_are_pruned_so_memory_is_bounded() -> None:
    r = RecentIds(window_ms=2 * HOUR_MS)
    r.add(id_hash("m", "old"), 0)
    r.add(id_hash("m", "new"), 10 * HOUR_MS)
    assert not r.might_contain(id_hash("m", "old"))
    assert r.might_contain(id_hash("m", "new"))
    assert len(r) == 1
