"""Fenced ingest state: versioned intent/done rows per (group, topic, partition).

Rows are append-only and read with argMax over (range_start, state_rank, epoch), so a late
intent from a zombie can never hide a newer completion (P4). On assignment the partition
resumes from this state, never silently from Kafka's committed offset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from consumer.store.backend import TIME_MS, Backend

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
    store: Backend, group: str, topic: str, partitions: Sequence[int]
) -> dict[int, RangeState]:
    """Latest state per partition; partitions never written are absent."""
    if not partitions:
        return {}
    rows = store.query(
        """SELECT partition,
                  argMax(tuple(range_start, range_end, state_rank, attempt, snapshot),
                         tuple(range_start, state_rank, epoch)) AS s
           FROM ingest_state
           WHERE group_id = {g:String} AND topic = {t:String} AND partition IN {p:Array(UInt32)}
           GROUP BY partition""",
        {"g": group, "t": topic, "p": list(partitions)},
    )
    out = {}
    for partition, s in rows:
        start, end, rank, attempt, snapshot = s
        out[int(partition)] = RangeState(
            int(partition), int(start), int(end), int(rank), int(attempt), str(snapshot)
        )
    return out


def write_states(
    store: Backend,
    group: str,
    topic: str,
    epoch: int,
    now_ms: int,
    states: Sequence[RangeState],
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
        },
    )
