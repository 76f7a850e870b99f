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


def test_a_carry_is_read_by_customer_not_through_the_outbox(store: Backend) -> None:
    """300,000 assigned pushes of other customers: one customer's carry is read under
    ClickHouse's max_rows_to_read (the by_bucket projection), as the whole read is not."""
    store.command(
        """INSERT INTO stripe_pushes (identifier, mode, meter, stripe_event_name, customer_id,
               bucket_start, revision, value, status_rank, first_attempt_at, updated_at,
               sent_value)
           SELECT concat('o', toString(number)), 'per_event', 'm', 'm',
                  concat('other', toString(number % 1000)),
                  fromUnixTimestamp64Milli({t:Int64} + number, 'UTC'), 0, 0.5, {sent:UInt8},
                  fromUnixTimestamp64Milli({t:Int64}, 'UTC'),
                  fromUnixTimestamp64Milli({t:Int64}, 'UTC'), 0
           FROM numbers(300000)""",
        {"t": NOW - 86_400_000, "sent": outbox.SENT},
    )
    first = pending(3, value="0.7", customers=1)  # c0: sends 0, 1, 1 (carry 0.1)
    outbox.write(store, first, PENDING, NOW)
    outbox.write_moved(store, Assigner(store, WHOLE_SUM).assign(first, ATTEMPTED, NOW), NOW)
    more = pending(1, start=10, value="0.95", customers=1)
    store.command("SET max_rows_to_read = 100000")
    try:
        (nxt,) = Assigner(store, WHOLE_SUM).assign(more, ATTEMPTED, NOW)
        assert nxt.sent == Decimal(1)  # 0.1 + 0.95
        with pytest.raises(Exception, match=r"TOO_MANY_ROWS|[Ll]imit for rows"):
            store.query("SELECT count() FROM stripe_pushes FINAL WHERE customer_id = 'c0'")
    finally:
        store.command("SET max_rows_to_read = 0")


def test_a_carry_kept_across_cycles_gives_the_amounts_of_a_fresh_read(store: Backend) -> None:
    """The emitter keeps each carry it read (forgetting it only when something else may
    have moved it): cycle after cycle, its amounts are those of an assigner that reads
    every carry from the store."""
    kept = Assigner(store, WHOLE_SUM)
    sent: dict[str, Decimal] = {}
    for cycle in range(6):
        batch = pending(9, start=cycle * 9, value="0.35", customers=4)
        outbox.write(store, batch, PENDING, NOW)
        expected = Assigner(store, WHOLE_SUM).assign(batch, ATTEMPTED, NOW)
        got = kept.assign(batch, ATTEMPTED, NOW)
        assert [p.sent for p in got] == [p.sent for p in expected]
        outbox.write_moved(store, got, NOW)
        sent |= {p.identifier: p.sent or Decimal(0) for p in got}
    for c in range(4):  # each customer billed the floor of its usage, never more
        usage = Decimal("0.35") * sum(1 for i in range(54) if i % 4 == c)
        billed = sum((v for k, v in sent.items() if int(k[2:]) % 4 == c), Decimal(0))
        assert billed == int(usage)
