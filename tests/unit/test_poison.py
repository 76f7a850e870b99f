"""The poison search (P7): simulate crash/complete outcomes and check what gets quarantined."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.intent.poison import SPLIT, Plan, after_crash, next_chunk

LIMIT = 3


def search(
    start: int,
    end: int,
    poison: set[int],
    stray_kills: frozenset[int] = frozenset(),
    late_kills: frozenset[int] = frozenset(),
) -> tuple[list[int], int]:
    """Drive formation like the consumer does; returns (quarantined offsets, crashes).
    `stray_kills` land before a formation's records are classified, `late_kills` after
    (where the consumer withdraws the attempt of a re-formed range or a chunk)."""
    quarantined: list[int] = []
    crashes = 0
    plan = Plan(start, end, 1)
    step = 0
    while True:
        step += 1
        assert step < 10_000, "the search does not terminate"
        poisoned = any(plan.start <= p < plan.end for p in poison)
        crashed = not plan.quarantine and (poisoned or step in stray_kills)
        late = not plan.quarantine and not crashed and step in late_kills
        if crashed or late:
            crashes += 1
            attempt = plan.attempt
            if late and (plan.attempt > 1 or plan.suspect is not None):
                attempt -= 1  # RangeMaker withdraws it once classified
            plan = after_crash(plan.start, plan.end, attempt, plan.suspect, LIMIT)
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


def test_a_withdrawn_attempt_is_retried_as_it_was() -> None:
    assert after_crash(42, 43, 0, (42, 49), LIMIT) == Plan(42, 43, 1, (42, 49))
    assert after_crash(10, 17, 0, (0, 100), LIMIT) == Plan(10, 17, 1, (0, 100))
    assert after_crash(0, 100, 0, None, LIMIT) == Plan(0, 100, 1)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 3000),
    poison=st.sets(st.integers(0, 2999), max_size=2),
    first=st.integers(1, 40),
    run=st.integers(1, 60),
    seed=st.integers(0, 2**32),
)
def test_a_crash_loop_after_classification_quarantines_nothing_innocent(
    size: int, poison: set[int], first: int, run: int, seed: int
) -> None:
    """A process that keeps dying after classifying (out of memory while writing, killed by
    its orchestrator), up to `run` times in a row, plus a stray early kill: only the poison
    messages are ever quarantined. A first formation's late crash counts (its attempt is not
    withdrawn: that would cost a write per batch), so early kills are kept below
    `LIMIT - 1`; `LIMIT` counted crashes of one offset quarantine it by design."""
    poison = {p for p in poison if p < size}
    rng = random.Random(seed)
    stray = frozenset(2 * rng.randint(1, 40) + 1 for _ in range(rng.randint(0, LIMIT - 2)))
    late = frozenset(range(first, first + run))
    quarantined, _ = search(0, size, poison, stray, late)
    assert quarantined == sorted(poison)
