"""Range formation: fix a partition's next range, its records and its snapshot (P1).

A formed range is frozen before anything is decided about its records: its intent is
written, then it is classified, then written. A crash at any point after the intent is
re-formed from that intent alone; a transient failure keeps the same formed range and
retries it, so a range is never classified twice with different inputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from confluent_kafka import Message

from consumer.classify.snapshot import Snapshot
from consumer.intent.poison import Plan, after_crash, next_chunk
from consumer.intent.tracks import Track
from consumer.records import RangeInput


@dataclass
class Formed:
    partition: int
    start: int
    end: int
    attempt: int
    snapshot: Snapshot
    inp: RangeInput
    quarantine: bool = False
    intended: bool = False  # its intent row is durable


def form(
    t: Track,
    topic: str,
    position: int,
    config_hash: str,
    now_ms: int,
    limit: int,
    topic_id: str = "",
) -> Formed | None:
    """The partition's next range, or None while its records are not all read yet.

    `position` is the consumer's position: a fresh range ends there (P8), so offsets the
    broker skips (transaction markers, compaction) still belong to a range. `topic_id`: the
    topic's incarnation, which the range's ledger rows carry (P2).
    """
    if t.reform is not None:
        st = t.reform
        crashed = Snapshot.from_json(st.snapshot)
        plan = after_crash(st.range_start, st.range_end, st.attempt, crashed.suspect, limit)
        snapshot = dataclasses.replace(crashed, suspect=plan.suspect)
    else:
        if not t.buffer:
            return None
        start = t.next_offset if t.next_offset is not None else _offset(t.buffer[0])
        chunk = next_chunk(start, t.suspect)
        plan = chunk or Plan(start, max(position, _offset(t.buffer[-1]) + 1), 1)
        # A poison search goes on with the configuration its crashed range was formed with.
        config = t.suspect_config if chunk is not None and t.suspect_config else config_hash
        snapshot = Snapshot(dict(t.watermarks), config, now_ms, suspect=plan.suspect)
    if position < plan.end:
        return None  # keep reading until the whole range is here
    return Formed(
        t.partition,
        plan.start,
        plan.end,
        plan.attempt,
        snapshot,
        RangeInput.of_messages(
            topic,
            t.partition,
            [m for m in t.buffer if plan.start <= _offset(m) < plan.end],
            topic_id,
        ),
        plan.quarantine,
    )


def _offset(msg: Message) -> int:
    return msg.offset() or 0
