"""Per-partition state the consumer keeps between ranges, rebuilt on every assignment."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from confluent_kafka import Message

from consumer.classify.recent import RecentIds
from consumer.classify.snapshot import Snapshot
from consumer.decode.keys import ids_keys
from consumer.intent.state import RangeState, load_states
from consumer.store.backend import Backend

log = logging.getLogger(__name__)


@dataclass
class Track:
    """One owned partition: where the next range starts, its watermarks, recent ids, an
    open intent that must be re-formed before anything new is written, and the span a
    poison search is still walking through (P7)."""

    partition: int
    next_offset: int | None
    watermarks: dict[str, int]
    recent: RecentIds
    reform: RangeState | None = None
    buffer: list[Message] = field(default_factory=list)  # consumed, not yet in a range
    suspect: tuple[int, int] | None = None
    suspect_config: str = ""


def load_tracks(
    store: Backend,
    group: str,
    topic: str,
    partitions: Sequence[int],
    dedup_window_ms: int,
    topic_id: str | None = None,
) -> dict[int, Track]:
    """Resume each partition from its fenced state; raises StoreError if state is unreadable."""
    states = load_states(store, group, topic, partitions, topic_id=topic_id)
    tracks = {}
    for p in partitions:
        st = states.get(p)
        snap = Snapshot.from_json(st.snapshot) if st else None
        marks = dict(snap.watermarks) if snap else {}
        recent = RecentIds(dedup_window_ms)
        _rebuild_recent(store, topic, p, marks, dedup_window_ms, recent)
        if st is None:
            tracks[p] = Track(p, None, marks, recent)
        elif st.open:
            log.warning(
                "partition %d: re-forming unfinished range [%d, %d) attempt %d",
                p,
                st.range_start,
                st.range_end,
                st.attempt,
            )
            tracks[p] = Track(p, st.range_start, marks, recent, reform=st)
        else:
            tracks[p] = Track(p, st.range_end, marks, recent)
            if snap and snap.suspect and snap.suspect[1] > st.range_end:
                tracks[p].suspect, tracks[p].suspect_config = snap.suspect, snap.config_hash
    return tracks


def _rebuild_recent(
    store: Backend,
    topic: str,
    partition: int,
    marks: dict[str, int],
    window_ms: int,
    recent: RecentIds,
) -> None:
    """Refill the recent-id filter from the ledger rows this partition wrote lately."""
    if not marks:
        return
    since = min(marks.values()) - window_ms
    rows = store.query(
        """SELECT meter, event_id, toUnixTimestamp64Milli(event_time) FROM usage_events
           WHERE topic = {t:String} AND partition = {p:UInt32}
             AND event_time >= fromUnixTimestamp64Milli({s:Int64}, 'UTC')""",
        {"t": topic, "p": partition, "s": since},
    )
    if rows:
        meters, ids, times = zip(*rows, strict=True)
        keys = ids_keys([str(m) for m in meters], [str(i) for i in ids])
        recent.add_keys(keys, np.array(times, np.int64))
