"""Per-partition state the consumer keeps between ranges, rebuilt on every assignment."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from confluent_kafka import Message

from consumer.classify.snapshot import Snapshot
from consumer.intent.state import RangeState, load_states
from consumer.store.backend import Backend

log = logging.getLogger(__name__)


@dataclass
class Track:
    """One owned partition: where the next range starts, its watermarks, an open
    intent that must be re-formed before anything new is written, and the span a
    poison search is still walking through (P7)."""

    partition: int
    next_offset: int | None
    watermarks: dict[str, int]
    reform: RangeState | None = None
    buffer: list[Message] = field(default_factory=list)  # consumed, not yet in a range
    suspect: tuple[int, int] | None = None
    suspect_config: str = ""


def load_tracks(
    store: Backend,
    group: str,
    topic: str,
    partitions: Sequence[int],
    topic_id: str | None = None,
) -> dict[int, Track]:
    """Resume each partition from its fenced state; raises StoreError if state is unreadable."""
    states = load_states(store, group, topic, partitions, topic_id=topic_id)
    tracks = {}
    for p in partitions:
        st = states.get(p)
        snap = Snapshot.from_json(st.snapshot) if st else None
        marks = dict(snap.watermarks) if snap else {}
        if st is None:
            tracks[p] = Track(p, None, marks)
        elif st.open:
            log.warning(
                "partition %d: re-forming unfinished range [%d, %d) attempt %d",
                p,
                st.range_start,
                st.range_end,
                st.attempt,
            )
            tracks[p] = Track(p, st.range_start, marks, reform=st)
        else:
            tracks[p] = Track(p, st.range_end, marks)
            if snap and snap.suspect and snap.suspect[1] > st.range_end:
                tracks[p].suspect, tracks[p].suspect_config = snap.suspect, snap.config_hash
    return tracks
