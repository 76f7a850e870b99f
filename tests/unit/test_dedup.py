from hypothesis import given
from hypothesis import strategies as st

from consumer.classify.recent import HOUR_MS, RecentIds
from consumer.decode.keys import id_hash


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


@given(
    st.lists(st.tuples(st.text(max_size=6), st.integers(0, 3 * HOUR_MS)), max_size=200),
    st.lists(st.text(max_size=6), max_size=50),
)
def test_batched_lookups_match_the_ids_added_in_any_order(
    added: list[tuple[str, int]], asked: list[str]
) -> None:
    r = RecentIds(window_ms=10 * HOUR_MS)
    half = len(added) // 2
    for eid, ts in added[:half]:
        r.add(id_hash("m", eid), ts)
    r.seen([id_hash("m", "probe")])  # a lookup sorts the first half in
    for eid, ts in added[half:]:
        r.add(id_hash("m", eid), ts)
    known = {eid for eid, _ in added}
    assert r.seen([id_hash("m", a) for a in asked]) == [a in known for a in asked]
    assert len(r) == len({(eid, ts // HOUR_MS) for eid, ts in added})


def test_the_window_costs_eight_bytes_an_id() -> None:
    r = RecentIds(window_ms=48 * HOUR_MS)
    for i in range(30_000):
        r.add(id_hash("m", f"e{i}"), i * HOUR_MS // 1_000)  # 30 event hours
        r.add(id_hash("m", f"e{i}"), i * HOUR_MS // 1_000)  # a copy: held once
    assert len(r) == 30_000
    assert r.nbytes == 8 * 30_000
