"""The consume loop: owns the partitions, forms ranges, and hands them to the commit stage.

Transient failures never become dead letters and never skip data (P6): a schema registry
or ClickHouse outage pauses the affected partitions, keeps their records, and retries the
same ranges until they go through. A partition whose state cannot be read on assignment
stays paused until it can (P4). Bugs raise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from consumer.classify import Classifier, Snapshot
from consumer.clock import Clock
from consumer.commit import CommitSequence
from consumer.config import parse_classification
from consumer.dedup import id_hash
from consumer.kafka_io import SideOutputError, to_record
from consumer.metrics import Metrics
from consumer.schemas import SchemaSourceUnavailable
from consumer.sink import RangeWrite, ledger_lookup
from consumer.store.backend import Backend, StoreError
from consumer.store.migrations import load_config
from consumer.tracks import Track, load_tracks
from consumer.validate import DAY_MS, Limits

log = logging.getLogger(__name__)
TRANSIENT = (StoreError, SchemaSourceUnavailable, SideOutputError)
MAX_BACKOFF = 5.0


@dataclass
class IngestContext:
    consumer: Consumer
    store: Backend
    commits: CommitSequence
    classifier: Classifier
    clock: Clock
    metrics: Metrics
    topic: str
    group: str
    config_hash: str
    dedup_window_ms: int
    max_invalid_ratio: float = 0.5
    flood_min_messages: int = 1000


class UnknownConfiguration(Exception):
    """A bug or a wiped store: an intent names a configuration nobody recorded."""


class DeadLetterFlood(Exception):
    """Most of a large range is invalid: a producer or schema is broken. Stop loudly rather
    than dead-letter everything; nothing of the range is written or committed."""


class Ingestor:
    """`step()` consumes one batch and writes and commits every range that is ready."""

    def __init__(self, ctx: IngestContext, batch_max: int, batch_seconds: float) -> None:
        self.ctx = ctx
        self.tracks: dict[int, Track] = {}
        self.unready: set[int] = set()
        self.paused: set[int] = set()
        self.retry: list[RangeWrite] = []
        self.catch_up: dict[int, int] = {}
        self._classifiers: dict[str, Classifier] = {}
        self.healthy = True
        self._failures = 0
        self._failed_now = False
        self._batch_max = batch_max
        self._batch_seconds = batch_seconds

    @property
    def committed(self) -> dict[int, int]:
        return self.ctx.commits.committed

    # -- assignment -------------------------------------------------------------------
    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        ours = [tp for tp in partitions if tp.topic == self.ctx.topic]
        try:
            loaded = self._load([int(tp.partition or 0) for tp in ours])
        except StoreError as exc:
            log.error("cannot read ingest state on assignment, pausing: %s", exc)
            consumer.incremental_assign(partitions)
            consumer.pause(ours)
            self.unready.update(int(tp.partition or 0) for tp in ours)
            return
        for tp in ours:
            start = loaded[int(tp.partition or 0)].next_offset
            if start is not None:
                tp.offset = start
        consumer.incremental_assign(partitions)

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Processing is synchronous, so nothing is in flight here: unwritten records and
        # ranges waiting for a retry are dropped uncommitted; the next owner re-reads them.
        gone = {int(tp.partition or 0) for tp in partitions}
        for p in gone:
            self.tracks.pop(p, None)
            self.committed.pop(p, None)
        self.unready -= gone
        self.paused -= gone
        self.retry = [r for r in self.retry if r.partition not in gone]
        self.catch_up = {p: o for p, o in self.catch_up.items() if p not in gone}
        consumer.incremental_unassign(partitions)

    def _load(self, partitions: list[int]) -> dict[int, Track]:
        c = self.ctx
        loaded = load_tracks(c.store, c.group, c.topic, partitions, c.dedup_window_ms)
        self.tracks.update(loaded)
        for p, t in loaded.items():
            if t.next_offset is not None and t.reform is None:
                self.committed[p] = t.next_offset
                # A crash between "done" and the Kafka commit leaves Kafka behind the state;
                # bring it level so lag and tooling agree with what is really done.
                self.catch_up[p] = t.next_offset
        return loaded

    def _retry_unready(self) -> None:
        if not self.unready:
            return
        parts = sorted(self.unready)
        try:
            loaded = self._load(parts)
        except StoreError as exc:
            log.warning("ingest state still unreadable: %s", exc)
            return
        for p in parts:
            start = loaded[p].next_offset
            if start is not None:
                self.ctx.consumer.seek(TopicPartition(self.ctx.topic, p, start))
        self.ctx.consumer.resume([TopicPartition(self.ctx.topic, p) for p in parts])
        self.unready.clear()

    # -- the loop -----------------------------------------------------------------------
    def step(self) -> int:
        """One poll: buffer what arrived, write ready ranges; returns records consumed."""
        c = self.ctx
        self._retry_unready()
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
        if self.catch_up:
            c.commits.commit_offsets(self.catch_up)
            self.catch_up = {}
        self._failed_now = False
        ranges = self.retry or self._form_ranges()
        if ranges:
            self._write(ranges)
        if not self._failed_now:
            self._recovered()
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
            try:
                r = self._form(t, positions.get(t.partition, -1))
            except TRANSIENT as exc:
                self._transient(f"partition {t.partition} classification", exc, [t.partition])
                continue
            if r is not None:
                ranges.append(r)
        return ranges

    def _form(self, t: Track, position: int) -> RangeWrite | None:
        c = self.ctx
        if t.reform is not None:
            if position < t.reform.range_end:
                return None  # keep reading until the whole intended range is here
            records = [r for r in t.buffer if r.offset < t.reform.range_end]
            rest = [r for r in t.buffer if r.offset >= t.reform.range_end]
            snapshot = Snapshot.from_json(t.reform.snapshot)
            start, end, attempt = t.reform.range_start, t.reform.range_end, t.reform.attempt + 1
        else:
            records, rest = t.buffer, []
            start = t.next_offset if t.next_offset is not None else records[0].offset
            end = max(position, records[-1].offset + 1)
            snapshot = Snapshot(dict(t.watermarks), c.config_hash, int(c.clock.now() * 1000))
            attempt = 1
        lookup = ledger_lookup(c.store, c.topic, t.partition, start, end)
        classifier = self._classifier_for(snapshot.config_hash, t.partition)
        classified = classifier.classify(records, snapshot, t.recent, lookup)
        bad = len(classified.invalid)
        if len(records) >= c.flood_min_messages and bad > c.max_invalid_ratio * len(records):
            reasons = sorted({d.reason for d in classified.invalid})
            raise DeadLetterFlood(
                f"partition {t.partition} offsets [{start}, {end}): {bad} of {len(records)} "
                f"messages invalid ({', '.join(reasons)}); stopping instead of dead-lettering "
                "them all (pipeline.max_invalid_ratio)"
            )
        t.buffer = rest  # only now: a transient failure above keeps the records buffered
        return RangeWrite(c.topic, t.partition, start, end, attempt, snapshot, classified)

    def _classifier_for(self, config_hash: str, partition: int) -> Classifier:
        """The classifier of the configuration a range was first formed with (P1)."""
        c = self.ctx
        if config_hash == c.config_hash:
            return c.classifier
        if config_hash not in self._classifiers:
            body = load_config(c.store, config_hash)
            if body is None:
                raise UnknownConfiguration(
                    f"partition {partition}: an open range was formed with configuration "
                    f"{config_hash}, which the store does not hold"
                )
            meters, future_s, past_days = parse_classification(body)
            log.warning(
                "partition %d: re-forming with the earlier configuration %s", partition, config_hash
            )
            self._classifiers[config_hash] = Classifier(
                c.classifier.decoder,
                {m.event_name: m for m in meters},
                Limits(future_s * 1000, past_days * DAY_MS),
            )
        return self._classifiers[config_hash]

    def _write(self, ranges: Sequence[RangeWrite]) -> None:
        try:
            self.ctx.commits.run(ranges, int(self.ctx.clock.now() * 1000))
        except TRANSIENT as exc:
            # ClickHouse (or the side-output topic) is shared: pause every partition, so no
            # buffer grows while the same ranges are retried.
            self.retry = list(ranges)
            self._transient("write", exc, list(self.tracks))
            return
        self.retry = []
        self._advance(ranges)

    def _transient(self, what: str, exc: Exception, partitions: list[int]) -> None:
        """Pause the partitions, keep their data, back off; the next step retries."""
        self.healthy = False
        self._failed_now = True
        self._failures += 1
        log.warning("%s failed, pausing and retrying: %s", what, exc)
        fresh = [p for p in partitions if p not in self.paused]
        if fresh:
            self.ctx.consumer.pause([TopicPartition(self.ctx.topic, p) for p in fresh])
            self.paused.update(fresh)
        self.ctx.clock.sleep(min(MAX_BACKOFF, 0.1 * 2 ** min(self._failures, 10)))

    def _recovered(self) -> None:
        """A step with no transient failure: resume whatever an earlier one paused."""
        if self.paused:
            self.ctx.consumer.resume([TopicPartition(self.ctx.topic, p) for p in self.paused])
            self.paused.clear()
        self.healthy, self._failures = True, 0

    def _advance(self, ranges: Sequence[RangeWrite]) -> None:
        m = self.ctx.metrics
        now = self.ctx.clock.now()
        for r in ranges:
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
            m.insert_rows.labels("usage_events").inc(len(cl.accepted))
            m.insert_rows.labels("dead_letters").inc(len(cl.invalid))
            m.insert_rows.labels("late_events").inc(len(cl.late))
            m.ranges_committed.inc()
            if r.attempt > 1:
                m.ranges_reformed.inc()
            if t is not None:
                t.next_offset = r.end
                t.watermarks = dict(cl.watermarks_after)
                if t.reform is not None and t.reform.range_end == r.end:
                    t.reform = None
                self._lag(t)
        for meter, mark in self._max_watermarks().items():
            m.watermark_lag.labels(meter).set(max(0.0, now - mark / 1000))
        m.dedup_filter_ids.set(sum(len(t.recent) for t in self.tracks.values()))

    def _lag(self, t: Track) -> None:
        """Lag from the fetch-response high watermark (cached): exact, no broker round trip."""
        tp = TopicPartition(self.ctx.topic, t.partition)
        try:
            _, high = self.ctx.consumer.get_watermark_offsets(tp, cached=True)
        except KafkaException:
            return
        if high >= 0 and t.next_offset is not None:
            self.ctx.metrics.consumer_lag.labels(str(t.partition)).set(high - t.next_offset)

    def _max_watermarks(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tracks.values():
            for meter, mark in t.watermarks.items():
                out[meter] = max(out.get(meter, mark), mark)
        return out
