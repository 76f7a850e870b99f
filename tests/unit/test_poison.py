"""The poison search (P7): simulate crash/complete outcomes and check what gets quarantined."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.intent.poison import SPLIT, Plan, after_crash, next_chunk

LIMIT = 3


def search(
    start: int, end: int, poison: set[int], stray_kills: frozenset[int] = frozenset()
) -> tuple[list[int], int]:
    """Drive formation like the consumer does; returns (quarantined offsets, crashes)."""
    quarantined: list[int] = []
    crashes = 0
    plan = Plan(start, end, 1)
    step = 0
    while True:
        step += 1
        assert step < 10_000, "the search does not terminate"
        crashed = not plan.quarantine and (
            any(plan.start <= p < plan.end for p in poison) or step in stray_kills
        )
        if crashed:
            crashes += 1
            plan = after_crash(plan.start, plan.end, plan.attempt, plan.suspect, LIMIT)
            continue
        if plan.quarantine:
            quarantined.append(plan.start)
        following = next_chunk(plan.end, plan.suspect)
        if plan.end >= end:
            return quarantined, crashes
        plan = following or Plan(plan.end, end, 1)


def test_a_range_is_retried_as_is_before_it_is_split() -> None:
    assert after_crash(0, 100, 1, None, LIMIT) == Plan(0, 100, 2)
    assert after_crash(0, 100, 2, None, LIMIT) == Plan(0, 100, 3)
    split = after_crash(0, 100, 3, None, LIMIT)
    assert split == Plan(0, -(-100 // SPLIT), 1, (0, 100))


def test_a_crashed_chunk_narrows_at_once_but_a_single_offset_needs_the_limit() -> None:
    assert after_crash(10, 17, 1, (0, 100), LIMIT).suspect == (10, 17)
    assert after_crash(42, 43, 1, (42, 49), LIMIT) == Plan(42, 43, 2, (42, 49))
    assert after_crash(42, 43, 2, (42, 49), LIMIT) == Plan(42, 43, 3, (42, 49))
    assert after_crash(42, 43, 3, (42, 49), LIMIT) == Plan(42, 43, 4, quarantine=True)


def test_chunks_walk_the_suspect_and_then_stop() -> None:
    assert next_chunk(7, (0, 100)) == Plan(7, 14, 1, (0, 100))
    assert next_chunk(98, (0, 100)) == Plan(98, 100, 1, (0, 100))
    assert next_chunk(100, (0, 100)) is None
    assert next_chunk(5, None) is None


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 5000),
    poison=st.sets(st.integers(0, 4999), max_size=3),
    seed=st.integers(0, 2**32),
)
def test_exactly_the_poison_messages_are_quarantined(
    size: int, poison: set[int], seed: int
) -> None:
    poison = {p for p in poison if p < size}
    rng = random.Random(seed)
    stray = frozenset(rng.randint(1, 60) for _ in range(rng.randint(0, 2)))  # random kills
    quarantined, crashes = search(0, size, poison, stray)
    assert quarantined == sorted(poison)
    if len(poison) == 1 and not stray:
        # limit as a whole, one crash per narrowing, limit on the single offset
        levels = 0
        n = size
        while n > 1:
            n = -(-n // SPLIT)
            levels += 1
        assert crashes <= 2 * LIMIT + levels


def test_stray_kills_alone_never_quarantine_anything() -> None:
    """Kills that never hit one formation `LIMIT` times in a row (here: never twice)."""
    for seed in range(200):
        rng = random.Random(seed)
        kills = frozenset(2 * rng.randint(1, 20) for _ in range(8))
        quarantined, _ = search(0, rng.randint(1, 3000), set(), kills)
        assert quarantined == []
