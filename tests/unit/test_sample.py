"""The generated sample means what its labels say, however late it is produced.

The consumer judges an event's time against its Kafka record's time (P1), so a message
labelled `future` is only dead-lettered if its record time is the sample's "now". A chaos
scenario that trickles waves for twenty minutes once produced future-dated messages with
the wall clock of the moment, turning some into accepted events that moved a watermark
half an hour ahead; these tests pin the record time to the labels.
"""

from __future__ import annotations

from collections import Counter

import pytest

from consumer.config import default_meters
from consumer.decode.event import DecodeError
from consumer.decode.reference import Decoder
from consumer.decode.schemas import LocalSchemaSource, reader_schema
from consumer.decode.validate import Invalid, Limits, validate
from consumer.local.sample import Message, generate

NOW_MS = 1_763_000_000_000
METERS = {m.event_name: m for m in default_meters()}
LIMITS = Limits()


def outcome(decoder: Decoder, m: Message, record_time_ms: int) -> str:
    """What the consumer's decode and validate stages make of one message."""
    try:
        event = decoder.decode(m.value)
    except DecodeError:
        return "undecodable"
    try:
        validate(event, record_time_ms, METERS, LIMITS)
    except Invalid as e:
        return e.reason
    return "valid"


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    return Decoder(mode="confluent", source=LocalSchemaSource(), reader=reader_schema())


def test_every_message_carries_the_samples_now_as_its_record_time() -> None:
    sample = generate(3000, 20, 4, NOW_MS, seed=3, cancels=True, restamped=0.01)
    assert {m.record_time_ms for m in sample.messages} == {NOW_MS}


@pytest.mark.parametrize("produced_after_minutes", [0, 16, 60])
def test_labels_hold_at_the_record_time_whenever_produced(
    decoder: Decoder, produced_after_minutes: int
) -> None:
    """Judged at their own record time the labels hold; judged at the time a slow trickle
    would have produced them (the old behaviour), future-dated messages become valid."""
    sample = generate(5000, 20, 4, NOW_MS, seed=11)
    seen: dict[str, Counter[str]] = {}
    drifted: Counter[str] = Counter()
    for m in sample.messages:
        assert m.record_time_ms is not None
        seen.setdefault(m.kind, Counter())[outcome(decoder, m, m.record_time_ms)] += 1
        if m.kind == "future":
            wall = NOW_MS + produced_after_minutes * 60_000
            drifted[outcome(decoder, m, wall)] += 1
    assert set(seen["future"]) == {"timestamp_in_future"}
    assert set(seen["undecodable"]) == {"undecodable"}
    assert "valid" not in seen["invalid"] and "undecodable" not in seen["invalid"]
    for kind in ("accepted", "duplicate", "late", "cancel"):
        assert set(seen.get(kind, {"valid": 1})) == {"valid"}, kind
    assert sum(seen["future"].values()) > 10
    # what the wall clock would have made of them: all still future only when produced
    # within the tolerance of the sample's now
    assert ("valid" in drifted) == (produced_after_minutes * 60_000 > 15 * 60_000)
