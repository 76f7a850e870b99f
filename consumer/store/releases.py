"""Offset ranges an operator let through the dead-letter flood stop (`dlq release`).

A release names one partition's offsets, both ends included. The consume loop asks only
when a range has tripped the stop (one keyed lookup), so a release costs nothing otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from consumer.store.backend import Backend


@dataclass(frozen=True)
class Release:
    topic: str
    partition: int
    first_offset: int
    last_offset: int
    reason: str
    who: str
    released_at_ms: int


def record(store: Backend, r: Release) -> None:
    store.command(
        """INSERT INTO dlq_releases (topic, partition, first_offset, last_offset, reason, who,
                                     released_at)
           VALUES ({t:String}, {p:UInt32}, {a:UInt64}, {b:UInt64}, {why:String}, {who:String},
                   fromUnixTimestamp64Milli({at:Int64}, 'UTC'))""",
        {
            "t": r.topic,
            "p": r.partition,
            "a": r.first_offset,
            "b": r.last_offset,
            "why": r.reason,
            "who": r.who,
            "at": r.released_at_ms,
        },
    )


def covering(store: Backend, topic: str, partition: int, first: int, last: int) -> Release | None:
    """A release holding every offset of [first, last], if one was recorded."""
    rows = store.query(
        """SELECT first_offset, last_offset, reason, who, toUnixTimestamp64Milli(released_at)
           FROM dlq_releases FINAL
           WHERE topic = {t:String} AND partition = {p:UInt32}
             AND first_offset <= {a:UInt64} AND last_offset >= {b:UInt64}
           ORDER BY released_at LIMIT 1""",
        {"t": topic, "p": partition, "a": first, "b": last},
    )
    if not rows:
        return None
    a, b, why, who, at = rows[0]
    return Release(topic, partition, int(a), int(b), str(why), str(who), int(at))
