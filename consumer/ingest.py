"""The consume loop: forms ranges per partition and runs the commit sequence.

The commit sequence, in order, for every batch of ranges (ARCHITECTURE.md P1-P5):
  1. record intent      ingest_state rank 1, with the range and its snapshot
  2. side outputs       dead letters and late events produced and confirmed
  3. ledger write       usage_events, dead_letters, late_events, per-event pushes
  4. windows            the touched minute windows recomputed from the ledger
  5. record done        ingest_state rank 2, with the watermarks after the range
  6. commit Kafka       offsets = range ends (consumer positions)
A crash anywhere re-forms the open range from its intent; every write converges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from consumer.classify import Classifier, Snapshot
from consumer.clock import Clock
from consumer.dedup import id_hash
from consumer.faults import fault_point
from consumer.kafka_io import SideOutputs, to_record
from consumer.metrics import Metrics
from consumer.sink import RangeWrite, batch_id, ledger_lookup, recompute_windows, write_effects
from consumer.state import DONE, INTENT, RangeState, write_states
from consumer.store.backend import Backend, StoreError
from consumer.tracks import Track, load_tracks

log = logging.getLogger(__name__)


@dataclass
class IngestContext:
    consumer: Consumer
    store: Backend
    side: SideOutputs
    classifier: Classifier
    clock: Clock
    metrics: Metrics
    group: str
    topic: str
    config_hash: str
    dedup_window_ms: int
    epoch: int


class Ingestor:
    """Owns the partition tracks; `step()` consumes one batch and commits what it wrote."""

    def __init__(self, ctx: IngestContext, batch_max: int, batch_seconds: float) -> None:
        self.ctx = ctx
        self.tracks: dict[int, Track] = {}
        self.unready: set[int] = set()
        self.committed: dict[int, int] = {}
        self._batch_max = batch_max
        self._batch_seconds = batch_seconds

    # -- assignment -------------------------------------------------------------------
    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        ours = [tp for tp in partitions if tp.topic == self.ctx.topic]
        try:
            loaded = self._load([tp.partition for tp in ours])
        except StoreError as exc:
            log.error("cannot read ingest state on assignment, pausing: %s", exc)
            consumer.incremental_assign(partitions)
            consumer.pause(ours)
            self.unready.update(tp.partition for tp in ours)
            return
        for tp in ours:
            start = loaded[tp.partition].next_offset
            if start is not None:
                tp.offset = start
        consumer.incremental_assign(partitions)

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Processing is synchronous: no range is in flight here. Unwritten buffered records
        # are dropped uncommitted; the next owner re-reads them.
        for tp in partitions:
            self.tracks.pop(tp.partition, None)
            self.unready.discard(tp.partition)
        consumer.incremental_unassign(partitions)

    def _load(self, partitions: list[int]) -> dict[int, Track]:
        c = self.ctx
        loaded = load_tracks(c.store, c.group, c.topic, partitions, c.dedup_window_ms)
        self.tracks.update(loaded)
        for p, t in loaded.items():
            if t.next_offset is not None and t.reform is None:
                self.committed[p] = t.next_offset
        return loaded

    def retry_unready(self) -> None:
        """P4: a partition whose state could not be read stays paused until it can."""
        if not self.unready:
            return
        parts = sorted(self.unready)
        try:
            loaded = self._load(parts)
        except StoreError as exc:
            log.warning("ingest state still unreadable: %s", exc)
            return
        tps = []
        for p in parts:
            start = loaded[p].next_offset
            tp = TopicPartition(self.ctx.topic, p, start if start is not None else -1001)
            if start is not None:
                self.ctx.consumer.seek(tp)
            tps.append(tp)
        self.ctx.consumer.resume(tps)
        self.unready.clear()

    # -- the loop -----------------------------------------------------------------------
    def step(self) -> int:
        """Consume one batch, write and commit every range that is ready; returns records."""
        c = self.ctx
        self.retry_unready()
        msgs = c.consumer.consume(self._batch_max, self._batch_seconds)
        c.metrics.last_poll.set(c.clock.now())
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(err)
            track = self.tracks.get(int(msg.partition() or 0))
            if track is not None:
                track.buffer.append(to_record(msg))
        c.metrics.events_consumed.inc(len(msgs))
        ranges = self._form_ranges()
        if ranges:
            self._write(ranges)
        return len(msgs)

    def _form_ranges(self) -> list[RangeWrite]:
        pending = [t for t in self.tracks.values() if t.buffer]
        if not pending:
            return []
        tps = [TopicPartition(self.ctx.topic, t.partition) for t in pending]
        positions = {
            int(tp.partition or 0): int(tp.offset or -1) for tp in self.ctx.consumer.position(tps)
        }
        ranges = []
        for t in pending:
            r = self._form(t, positions.get(t.partition, -1))
            if r is not None:
                ranges.append(r)
        return ranges

    def _form(self, t: Track, position: int) -> RangeWrite | None:
        c = self.ctx
        if t.reform is not None:
            if position < t.reform.range_end:
                return None  # keep reading until the whole intended range is here
            records = [r for r in t.buffer if r.offset < t.reform.range_end]
            t.buffer = [r for r in t.buffer if r.offset >= t.reform.range_end]
            snapshot = Snapshot.from_json(t.reform.snapshot)
            if snapshot.config_hash != c.config_hash:
                log.warning("partition %d: re-forming with a changed configuration", t.partition)
            c.metrics.ranges_reformed.inc()
            start, end, attempt = t.reform.range_start, t.reform.range_end, t.reform.attempt + 1
        else:
            records, t.buffer = t.buffer, []
            start = t.next_offset if t.next_offset is not None else records[0].offset
            end = max(position, records[-1].offset + 1)
            snapshot = Snapshot(dict(t.watermarks), c.config_hash, int(c.clock.now() * 1000))
            attempt = 1
        lookup = ledger_lookup(c.store, c.topic, t.partition, start, end)
        classified = c.classifier.classify(records, snapshot, t.recent, lookup)
        return RangeWrite(c.topic, t.partition, start, end, attempt, snapshot, classified)

    def _write(self, ranges: Sequence[RangeWrite]) -> None:
        c = self.ctx
        now_ms = int(c.clock.now() * 1000)
        token = batch_id(ranges)
        timed = _timer(c.metrics)
        timed(
            "ingest_state",
            lambda: write_states(
                c.store,
                c.group,
                c.topic,
                c.epoch,
                now_ms,
                [
                    RangeState(r.partition, r.start, r.end, INTENT, r.attempt, r.snapshot.to_json())
                    for r in ranges
                ],
            ),
        )
        fault_point("after_intent")
        timed(
            "side_outputs",
            lambda: c.side.publish(
                [d for r in ranges for d in r.classified.invalid],
                [x for r in ranges for x in r.classified.late],
            ),
        )
        timed("usage_events", lambda: write_effects(c.store, token, ranges, now_ms))
        fault_point("after_insert")
        timed("usage_windows", lambda: recompute_windows(c.store, token, now_ms))
        timed(
            "ingest_state",
            lambda: write_states(
                c.store,
                c.group,
                c.topic,
                c.epoch,
                now_ms,
                [
                    RangeState(
                        r.partition,
                        r.start,
                        r.end,
                        DONE,
                        r.attempt,
                        Snapshot(
                            r.classified.watermarks_after, c.config_hash, r.snapshot.stamp_ms
                        ).to_json(),
                    )
                    for r in ranges
                ],
            ),
        )
        fault_point("after_done")
        self._commit(ranges)
        self._advance(ranges)

    def _commit(self, ranges: Sequence[RangeWrite]) -> None:
        offsets = [TopicPartition(r.topic, r.partition, r.end) for r in ranges]
        try:
            self.ctx.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # Harmless for correctness: ingest_state already says done, and it is what a
            # new owner resumes from. Logged so a persistent failure is visible.
            log.warning("Kafka commit failed (state is durable, will resume from it): %s", exc)

    def _advance(self, ranges: Sequence[RangeWrite]) -> None:
        m = self.ctx.metrics
        for r in ranges:
            self.committed[r.partition] = r.end
            t = self.tracks.get(r.partition)
            cl = r.classified
            for a in cl.accepted:
                m.events_accepted.labels(a.meter.name).inc()
                if t is not None:
                    t.recent.add(id_hash(a.meter.name, a.event.event_id), a.event.timestamp_ms)
            for meter, n in cl.duplicates.items():
                m.events_duplicate.labels(meter).inc(n)
            for x in cl.late:
                m.events_late.labels(x.meter.name).inc()
            for d in cl.invalid:
                m.events_invalid.labels(d.reason).inc()
            m.dedup_false_positives.inc(cl.false_positives)
            m.ranges_committed.inc()
            if t is not None:
                t.next_offset = r.end
                t.watermarks = dict(cl.watermarks_after)
                if t.reform is not None and t.reform.range_end == r.end:
                    t.reform = None
        m.dedup_filter_ids.set(sum(len(t.recent) for t in self.tracks.values()))


def _timer(metrics: Metrics) -> Callable[[str, Callable[[], object]], None]:
    def timed(table: str, fn: Callable[[], object]) -> None:
        with metrics.insert_seconds.labels(table).time():
            fn()

    return timed
