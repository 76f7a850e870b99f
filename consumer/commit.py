"""Commit stage: the numbered write sequence of a batch of ranges, then the Kafka commit.

  1. record intent      ingest_state rank 1: the range, its attempt and snapshot (P1)
  2. side outputs       dead letters and late events produced, delivery confirmed (P5)
  3. ledger write       usage_events, dead_letters, late_events, per-event pushes (P3)
  4. windows            the touched minute windows recomputed from the ledger (P3)
  5. record done        ingest_state rank 2, with the watermarks after the range
  6. commit Kafka       offsets = range ends (consumer positions, P8); offsets only grow

A crash anywhere leaves an intent that the next owner re-forms; every write converges.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, TopicPartition

from consumer.classify import Snapshot
from consumer.faults import fault_point
from consumer.kafka_io import SideOutputs
from consumer.metrics import Metrics
from consumer.sink import RangeWrite, batch_id, recompute_windows, write_effects
from consumer.state import DONE, INTENT, RangeState, write_states
from consumer.store.backend import Backend

log = logging.getLogger(__name__)


class OffsetsWentBackwards(AssertionError):
    """A bug: a commit would move a partition's offset back and re-bill what it covers."""


@dataclass
class CommitSequence:
    store: Backend
    side: SideOutputs
    consumer: Consumer
    metrics: Metrics
    group: str
    topic: str
    epoch: int
    config_hash: str

    def __post_init__(self) -> None:
        self.committed: dict[int, int] = {}

    def run(self, ranges: Sequence[RangeWrite], now_ms: int) -> None:
        self._check_forward(ranges)
        token = batch_id(ranges)
        self._timed("ingest_state", lambda: self._states(ranges, INTENT, now_ms))
        fault_point("after_intent")
        self._timed(
            "side_outputs",
            lambda: self.side.publish(
                [d for r in ranges for d in r.classified.invalid],
                [x for r in ranges for x in r.classified.late],
            ),
        )
        self._timed("usage_events", lambda: write_effects(self.store, token, ranges, now_ms))
        fault_point("after_insert")
        self._timed("usage_windows", lambda: recompute_windows(self.store, token, now_ms))
        self._timed("ingest_state", lambda: self._states(ranges, DONE, now_ms))
        fault_point("after_done")
        self._commit_kafka(ranges)

    def _states(self, ranges: Sequence[RangeWrite], rank: int, now_ms: int) -> None:
        rows = []
        for r in ranges:
            if rank == INTENT:
                snap = dataclasses.replace(r.snapshot, schema_ids=sorted(r.classified.schema_ids))
            else:  # the next range starts from the watermarks this one ended with
                snap = Snapshot(
                    r.classified.watermarks_after, self.config_hash, r.snapshot.stamp_ms
                )
            rows.append(RangeState(r.partition, r.start, r.end, rank, r.attempt, snap.to_json()))
        write_states(self.store, self.group, self.topic, self.epoch, now_ms, rows)

    def _check_forward(self, ranges: Sequence[RangeWrite]) -> None:
        for r in ranges:
            last = self.committed.get(r.partition)
            if r.end < r.start or (last is not None and r.end < last):
                raise OffsetsWentBackwards(
                    f"partition {r.partition}: range [{r.start}, {r.end}) after {last}"
                )

    def _commit_kafka(self, ranges: Sequence[RangeWrite]) -> None:
        self.commit_offsets({r.partition: r.end for r in ranges})

    def commit_offsets(self, ends: dict[int, int]) -> None:
        offsets = [TopicPartition(self.topic, p, end) for p, end in ends.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # Harmless for correctness: ingest_state already says done, and it is what a
            # new owner resumes from. Logged so a persistent failure is visible.
            log.warning("Kafka commit failed (state is durable, will resume from it): %s", exc)
        self.committed.update(ends)

    def _timed(self, step: str, fn: Callable[[], object]) -> None:
        with self.metrics.insert_seconds.labels(step).time():
            fn()
