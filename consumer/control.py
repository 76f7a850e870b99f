"""The control topic: one partition whose offsets order claims across every process.

A claim's offset is an epoch: a process that claims later gets a higher one, whatever the
hosts' clocks say. The emitter lease and the ingest fencing epoch are both taken this way.
"""

from __future__ import annotations

import json
from typing import Any

from confluent_kafka import Message, Producer

# Epochs written before the control topic existed were wall-clock milliseconds (below
# 2^42): claims start above all of them, so a newer process still wins every tie.
EPOCH_BASE = 1 << 62


class ClaimFailed(Exception):
    """The claim was not appended in time (transient: the broker is away)."""


def append(producer: Producer, topic: str, what: dict[str, str], timeout: float = 10.0) -> Message:
    """Append a record to the control partition; returns it as delivered (its offset, and
    the broker's append time where the topic is LogAppendTime)."""
    got: list[Message] = []
    failed: list[Any] = []

    def delivered(err: Any, msg: Message) -> None:
        if err is not None:
            failed.append(err)
        else:
            got.append(msg)

    producer.produce(topic, json.dumps(what).encode(), partition=0, on_delivery=delivered)
    producer.flush(timeout)
    if failed or not got:
        raise ClaimFailed(f"claim on {topic} not appended: {failed or 'timeout'}")
    return got[0]


def claim(producer: Producer, topic: str, what: dict[str, str], timeout: float = 10.0) -> int:
    """Append a claim to the control partition; returns its epoch."""
    return EPOCH_BASE + int(append(producer, topic, what, timeout).offset() or 0)
