"""The emitter's bulk reads of the outbox in chDB: never-sent pushes read ahead once per
cycle are each handed out once, and carries read once per cycle give exactly the amounts
a fresh read for every batch would."""

from __future__ import annotations

from decimal import Decimal

import pytest

from consumer.emitter.plan import outbox
from consumer.emitter.plan.outbox import ATTEMPTED, PENDING, REJECTED, Push
from consumer.emitter.plan.units import Assigner, Rule
from consumer.store.backend import Backend

pytestmark = pytest.mark.integration
NOW = 1_790_000_000_000
WHOLE_SUM = {"m": Rule("whole", True)}


@pytest.fixture
def store(migrated_store: Backend) -> Backend:
    return migrated_store


def pending(n: int, start: int = 0, value: str = "0.4", customers: int = 3) -> list[Push]:
    return [
        Push(f"id{i:05d}", "per_event", "m", "m", f"c{i % customers}", NOW - 3_600_000 + i,
             0, Decimal(value), 0)
        for i in range(start, start + n)
    ]  # fmt: skip


def test_read_ahead_hands_out_each_never_sent_push_once_in_order(store: Backend) -> None:
    outbox.write(store, pending(25), PENDING, NOW)
    ahead = outbox.ReadAhead(store, size=10)
    takes: list[list[str]] = []
    while batch := ahead.take(4, limit_ms=0):
        takes.append([p.identifier for p in batch])
        # what a top-up does before the next take: the first attempts are written
        outbox.write_moved(store, [p.moved(ATTEMPTED, first_attempt_ms=NOW) for p in batch], NOW)
        if len(takes) == 2:  # written while pushes of the first read are still held
            outbox.write(store, pending(2, start=100), PENDING, NOW)
    handed = [i for t in takes for i in t]
    assert len(handed) == len(set(handed))  # none twice
    assert set(handed) == {p.identifier for p in pending(25)} | {"id00100", "id00101"}
    # a read of 10 is handed out as 4, 4, 2 before the outbox is read again
    assert [len(t) for t in takes[:3]] == [4, 4, 2]
    assert handed[:10] == sorted(handed[:10])
    assert ahead.take(4, limit_ms=0) == []  # all written: nothing is handed out again


def test_read_ahead_hands_out_again_what_was_never_written(store: Backend) -> None:
    outbox.write(store, pending(3), PENDING, NOW)
    ahead = outbox.ReadAhead(store, size=10)
    first = ahead.take(10, limit_ms=0)
    assert ahead.take(10, limit_ms=0) == first  # a crashed top-up loses nothing


def test_read_ahead_leaves_out_pushes_that_crossed_the_limit(store: Backend) -> None:
    outbox.write(store, pending(6), PENDING, NOW)
    ahead = outbox.ReadAhead(store, size=10)
    assert len(ahead.take(2, limit_ms=0)) == 2
    later = ahead.take(10, limit_ms=NOW - 3_600_000 + 4)  # pushes 2 and 3 are now too old
    assert [p.identifier for p in later] == ["id00004", "id00005"]


def test_carries_read_once_a_cycle_give_the_amounts_of_a_read_per_batch(
    store: Backend,
) -> None:
    pushes = pending(40, customers=3)
    outbox.write(store, pushes, PENDING, NOW)
    cached = Assigner(store, WHOLE_SUM)
    cached.forget()
    amounts: dict[str, Decimal | None] = {}
    for lo in range(0, 40, 7):
        fresh_reader = Assigner(store, WHOLE_SUM)  # reads the carries from the store
        expected = fresh_reader.assign(pushes[lo : lo + 7], ATTEMPTED, NOW)
        got = cached.assign(pushes[lo : lo + 7], ATTEMPTED, NOW)
        assert [p.sent for p in got] == [p.sent for p in expected]
        outbox.write_moved(store, got, NOW)
        amounts |= {p.identifier: p.sent for p in got}
    # 40 pushes of 0.4 over 3 customers: each customer is billed the floor of its usage
    per_customer = {c: sum((amounts[p.identifier] or 0 for p in pushes if p.customer_id == c),
                           Decimal(0)) for c in ("c0", "c1", "c2")}  # fmt: skip
    assert per_customer == {"c0": Decimal(5), "c1": Decimal(5), "c2": Decimal(5)}


def test_a_rejection_between_cycles_is_taken_out_of_the_carry(store: Backend) -> None:
    first = pending(3, value="0.7", customers=1)  # 2.1: sends 0, 1, 1 (carry 0.1)
    outbox.write(store, first, PENDING, NOW)
    assigner = Assigner(store, WHOLE_SUM)
    done = assigner.assign(first, ATTEMPTED, NOW)
    outbox.write_moved(store, done, NOW)
    assert [p.sent for p in done] == [Decimal(0), Decimal(1), Decimal(1)]
    # Stripe's error report rejects the last push (0.7 usage, 1 sent): carry becomes -0.3+0.7
    outbox.write(store, [done[2].moved(REJECTED, reason="rejected")], REJECTED, NOW)
    more = pending(1, start=10, value="0.7", customers=1)
    outbox.write(store, more, PENDING, NOW)
    assigner.forget()  # a new cycle
    (nxt,) = assigner.assign(more, ATTEMPTED, NOW)
    # usage not rejected: 0.7 + 0.7 + 0.7 = 2.1, sent 0 + 1 so far: this push sends 1
    assert nxt.sent == Decimal(1)
