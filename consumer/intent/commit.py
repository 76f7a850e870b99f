"""Commit stage: the numbered write sequence of a batch of ranges, then the Kafka commit.

  1. record intent      ingest_state rank 1: the range, its attempt and snapshot (P1),
                        written when the range is formed, before it is classified, so a
                        message that crashes classification is counted against it (P7)
  2. side outputs       dead letters and late events produced, delivery confirmed (P5)
  3. ledger write       usage_events, per-event pushes, cancellations, dead_letters,
                        late_events (P3)
  4. window job         the minutes the batch touched, recorded pending (consumer/sinks/rollup.py)
  5. record done        ingest_state rank 2, with the watermarks after the range
  6. windows            the job is queued: the rollup thread recomputes the touched
                        windows from the ledger while the next batch is read; a job a
                        crash leaves pending runs again on the next assignment (P3)
  7. commit Kafka       offsets = range ends (consumer positions, P8); offsets only grow

Steps 2 and 3 run at once where nothing orders them: the side outputs, and the writes
nothing else reads (pushes, dead letters, late events), go to a small pool while the
ledger is written; all of them end before step 4.

A crash anywhere leaves an intent that the next owner re-forms, or a pending window job
that it runs; every write converges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, TopicPartition

from consumer import crash_points
from consumer.classify.snapshot import Snapshot
from consumer.intent.forming import Formed
from consumer.intent.state import DONE, INTENT, RangeState, write_states
from consumer.metrics import Metrics
from consumer.sinks.ledger import (
    RangeWrite,
    accepted_table,
    batch_id,
    cancels_of,
    write_ledger,
    write_outputs,
)
from consumer.sinks.rollup import Rollup, WindowJob
from consumer.sinks.side_outputs import SideOutputs
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
    rollup: Rollup
    tenant_property: str | None = None  # stripe.account_property: tenants kept per customer

    def __post_init__(self) -> None:
        self._pool = futures.ThreadPoolExecutor(2, thread_name_prefix="commit")
        self.committed: dict[int, int] = {}
        self.topic_id = ""  # the incarnation of the topic this owner was assigned
        self._written_ms = 0

    def _version(self, now_ms: int) -> int:
        """State rows of one owner get strictly increasing `written_at` (the last tiebreak)."""
        self._written_ms = max(now_ms, self._written_ms + 1)
        return self._written_ms

    def intend(self, formed: Sequence[Formed], now_ms: int) -> None:
        """Step 1 for several partitions in one insert."""
        self._intents(formed, now_ms, lambda f: f.attempt)
        crash_points.reached("after_intent")

    def withdraw(self, f: Formed, now_ms: int) -> None:
        """Uncount the range's attempt: its records were classified, so a crash or a stop
        from here on is not theirs and never narrows a poison search towards them (P7)."""
        self._intents([f], now_ms, lambda f: f.attempt - 1)

    def _intents(
        self, formed: Sequence[Formed], now_ms: int, attempt: Callable[[Formed], int]
    ) -> None:
        rows = [
            RangeState(f.partition, f.start, f.end, INTENT, attempt(f), f.snapshot.to_json())
            for f in formed
        ]
        self._timed(
            "ingest_state",
            lambda: write_states(
                self.store,
                self.group,
                self.topic,
                self.epoch,
                self._version(now_ms),
                rows,
                self.topic_id,
            ),
        )

    def run(
        self,
        ranges: Sequence[RangeWrite],
        now_ms: int,
        ledger_written: Callable[[], None] = lambda: None,
    ) -> None:
        """Steps 2-7 for ranges whose intents are durable. The side outputs and the writes
        nothing else reads (pushes, dead letters, late events) run on the pool while this
        thread writes the ledger; all of them end before the window job and `done`.
        `ledger_written` is called as soon as the ledger write is durable (the ingest loop
        ends its turn on the store's ledger there)."""
        self._check_forward(ranges)
        token = batch_id(ranges)
        side = self._pool.submit(
            self._timed,
            "side_outputs",
            lambda: self.side.publish(
                [d for r in ranges for d in r.classified.invalid],
                [x for r in ranges for x in r.classified.late],
            ),
        )
        outputs = self._pool.submit(
            self._timed, "outputs", lambda: write_outputs(self.store, token, ranges, now_ms)
        )
        try:
            self._timed(
                "usage_events",
                lambda: write_ledger(self.store, token, ranges, self.tenant_property),
            )
            ledger_written()
        finally:
            # Never leave a write of this attempt running into the next one.
            futures.wait([side, outputs])
        side.result()
        outputs.result()
        crash_points.reached("after_insert")
        spans = [(r.partition, r.start, r.end) for r in ranges]
        held = {m for r in ranges for m in r.classified.held_minutes}
        job = WindowJob.of_batch(token, spans, accepted_table(ranges), cancels_of(ranges), held)
        self._timed("window_jobs", lambda: self.rollup.record(job))
        self._timed("ingest_state", lambda: self._done(ranges, now_ms))
        crash_points.reached("after_done")
        # Queued before the commit: whoever sees the offsets committed also sees the rollup
        # behind until these windows are recomputed (the emitter's idle signal relies on it).
        # The recompute reads only the durable ledger, so it may run before the commit.
        self.rollup.submit(job)
        self._commit_kafka(ranges)

    def _done(self, ranges: Sequence[RangeWrite], now_ms: int) -> None:
        rows = []
        for r in ranges:
            # The next range starts from the watermarks this one ended with, and goes on
            # with a poison search this range was a chunk of. The schema ids are known only
            # now: the headers are parsed after the intent (P7).
            suspect = r.snapshot.suspect
            snap = Snapshot(
                r.classified.watermarks_after,
                r.snapshot.config_hash,
                r.snapshot.stamp_ms,
                r.classified.schema_ids,
                suspect=suspect if suspect and r.end < suspect[1] else None,
            )
            rows.append(RangeState(r.partition, r.start, r.end, DONE, r.attempt, snap.to_json()))
        version = self._version(now_ms)
        write_states(self.store, self.group, self.topic, self.epoch, version, rows, self.topic_id)

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

    def close(self) -> None:
        self._pool.shutdown()
        self.rollup.close()

    def _timed(self, step: str, fn: Callable[[], object]) -> None:
        with self.metrics.insert_seconds.labels(step).time():
            fn()
