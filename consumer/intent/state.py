"""Fenced ingest state: versioned intent/done rows per (group, topic, partition).

Rows are append-only (`ingest_state`, the history) and the winner by (range_start,
state_rank, epoch, written_at) is kept per partition in `ingest_latest` (migration 15), so
a late intent from a zombie can never hide a newer completion (P4); within one owner a
later row of the same range and rank wins (an attempt withdrawn by a deliberate stop). On
assignment the partition resumes from this state, never silently from Kafka's committed
offset, and reads one row a partition however long it has run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from consumer.records import TIME_MS
from consumer.store.backend import Backend

INTENT, DONE = 1, 2


@dataclass(frozen=True)
class RangeState:
    partition: int
    range_start: int
    range_end: int
    rank: int
    attempt: int
    snapshot: str

    @property
    def open(self) -> bool:
        """An intent with no completion: the range must be re-formed before moving on."""
        return self.rank == INTENT


def load_states(
    store: Backend,
    group: str,
    topic: str,
    partitions: Sequence[int],
    *,
    topic_id: str | None = None,
) -> dict[int, RangeState]:
    """Latest state per partition; partitions never written are absent.

    With `topic_id`, only that incarnation of the topic counts (rows written before ids were
    recorded count as the current one): offsets of a deleted topic mean nothing in its
    re-created namesake."""
    if not partitions:
        return {}
    rows = store.query(
        """SELECT partition,
                  argMax(tuple(range_start, range_end, state_rank, attempt, snapshot), version)
           FROM ingest_latest
           WHERE group_id = {g:String} AND topic = {t:String} AND partition IN {p:Array(UInt32)}
             AND ({any:UInt8} = 1 OR topic_id IN ({id:String}, ''))
           GROUP BY partition""",
        {
            "g": group,
            "t": topic,
            "p": list(partitions),
            "any": int(topic_id is None),
            "id": topic_id or "",
        },
    )
    out = {}
    for partition, s in rows:
        start, end, rank, attempt, snapshot = s
        out[int(partition)] = RangeState(
            int(partition), int(start), int(end), int(rank), int(attempt), str(snapshot)
        )
    return out


def earlier_incarnation(
    store: Backend, group: str, topic: str, topic_id: str, partitions: Sequence[int]
) -> set[int]:
    """Partitions with state from a topic of this name that was deleted and re-created."""
    if not partitions or not topic_id:
        return set()
    rows = store.query(
        """SELECT DISTINCT partition FROM ingest_latest
           WHERE group_id = {g:String} AND topic = {t:String} AND partition IN {p:Array(UInt32)}
             AND topic_id NOT IN ({id:String}, '')""",
        {"g": group, "t": topic, "p": list(partitions), "id": topic_id},
    )
    return {int(r[0]) for r in rows}


def write_states(
    store: Backend,
    group: str,
    topic: str,
    epoch: int,
    now_ms: int,
    states: Sequence[RangeState],
    topic_id: str = "",
) -> None:
    """One columnar insert of intent or done rows for several partitions."""
    if not states:
        return
    n = len(states)
    store.insert_columns(
        "ingest_state",
        {
            "group_id": pa.array([group] * n),
            "topic": pa.array([topic] * n),
            "partition": pa.array([s.partition for s in states], pa.uint32()),
            "range_start": pa.array([s.range_start for s in states], pa.int64()),
            "range_end": pa.array([s.range_end for s in states], pa.int64()),
            "state_rank": pa.array([s.rank for s in states], pa.uint8()),
            "epoch": pa.array([epoch] * n, pa.uint64()),
            "attempt": pa.array([s.attempt for s in states], pa.uint32()),
            "snapshot": pa.array([s.snapshot for s in states]),
            "written_at": pa.array([now_ms] * n, TIME_MS),
            "topic_id": pa.array([topic_id] * n),
        },
    )
