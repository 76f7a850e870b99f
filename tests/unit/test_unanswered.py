"""The count of a push's unanswered sends lives at the end of its reason, whatever it holds."""

from __future__ import annotations

from decimal import Decimal

from consumer.emitter.plan.outbox import ATTEMPTED, Push
from consumer.emitter.send.unanswered import unanswered, with_count

PUSH = Push("id", "per_event", "tokens", "tokens", "cus", 0, 0, Decimal(1), 5, ATTEMPTED)


def test_the_count_is_set_read_and_cleared_keeping_the_reason() -> None:
    assert unanswered(PUSH) == 0
    once = with_count(PUSH, 1)
    assert once.reason == "unanswered sends: 1" and unanswered(once) == 1
    assert with_count(once, 0) == PUSH
    redated = PUSH._replace(reason="redated from 2026-01-01T00:00:00Z")
    twice = with_count(with_count(redated, 1), 2)
    assert twice.reason == "redated from 2026-01-01T00:00:00Z; unanswered sends: 2"
    assert unanswered(twice) == 2 and with_count(twice, 0) == redated
