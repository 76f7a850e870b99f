"""The consume loop: owns the partitions, buffers their records, has ranges made of them
(consumer/ingest/ranges.py) and hands those to the commit stage.

Transient failures never become dead letters and never skip data (P6): a schema registry
or ClickHouse outage pauses the affected partitions, keeps their records, and retries the
same ranges until they go through. A partition whose state cannot be read on assignment
stays paused until it can (P4); one without state but with rows in the ledger lost its
state (a host crash without fsync) and is read again from the start of what Kafka retains,
never resumed from Kafka's committed offset (P8). Bugs raise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from consumer.ingest.context import TRANSIENT, UNREADY, IngestContext
from consumer.ingest.ledger_lock import Turn
from consumer.ingest.ranges import DeadLetterFlood, RangeMaker, UnknownConfiguration
from consumer.intent.state import earlier_incarnation
from consumer.intent.tracks import Track, load_tracks
from consumer.sinks.ledger import RangeWrite, partitions_with_rows
from consumer.store.backend import StoreError

__all__ = ["DeadLetterFlood", "IngestContext", "Ingestor", "UnknownConfiguration"]
log = logging.getLogger(__name__)
MAX_BACKOFF = 5.0
LAG_EVERY = 15.0  # seconds between asking the broker for every partition's end offset


class Ingestor:
    """`step()` consumes one batch and writes and commits every range that is ready."""

    def __init__(self, ctx: IngestContext, batch_max: int, batch_seconds: float) -> None:
        self.ctx = ctx
        self.tracks: dict[int, Track] = {}
        self.unready: set[int] = set()
        self.paused: set[int] = set()
        self._backoff = 0.0
        self.catch_up: dict[int, int] = {}
        self.ranges = RangeMaker(ctx, self.tracks)
        self._recreated: set[int] = set()
        self._stateless: set[int] = set()  # no state, yet rows in the ledger: state lost
        self.healthy = True
        self._failures = 0
        self._failed_now = False
        self._batch_max = batch_max
        self._batch_seconds = batch_seconds
        self._lag_asked = ctx.clock.monotonic()

    @property
    def committed(self) -> dict[int, int]:
        return self.ctx.commits.committed

    # -- assignment -------------------------------------------------------------------
    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        ours = [tp for tp in partitions if tp.topic == self.ctx.topic]
        try:
            loaded = self._load([int(tp.partition or 0) for tp in ours])
        except UNREADY as exc:
            log.error("cannot read ingest state on assignment, pausing: %s", exc)
            if isinstance(exc, StoreError):  # counted like every retried ClickHouse failure
                self.ctx.metrics.clickhouse_errors.labels("ingest").inc()
            consumer.incremental_assign(partitions)
            consumer.pause(ours)
            self.unready.update(int(tp.partition or 0) for tp in ours)
            return
        for tp in ours:
            start = self._start(loaded[int(tp.partition or 0)])
            if start is not None:
                tp.offset = start
        consumer.incremental_assign(partitions)

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Processing is synchronous, so nothing is in flight here: unwritten records and
        # ranges waiting for a retry are dropped uncommitted; the next owner re-reads them.
        gone = {int(tp.partition or 0) for tp in partitions}
        for p in gone:
            if self.tracks.pop(p, None) is not None:
                self.ctx.metrics.partitions_owned.dec()
            self.committed.pop(p, None)
        self.unready -= gone
        self.paused -= gone
        self.ranges.forget(gone)
        self.catch_up = {p: o for p, o in self.catch_up.items() if p not in gone}
        consumer.incremental_unassign(partitions)

    def _load(self, partitions: list[int]) -> dict[int, Track]:
        c = self.ctx
        topic_id = c.topic_ids(c.topic) if c.topic_ids is not None else None
        loaded = load_tracks(c.store, c.group, c.topic, partitions, topic_id)
        # windows a crash left pending (a range still open is re-formed: it resumes there)
        c.commits.rollup.recover(
            {p: None if t.reform else t.next_offset for p, t in loaded.items()}
        )
        self._recreated = set()
        fresh = [p for p, t in loaded.items() if t.next_offset is None]
        if topic_id is not None:
            c.commits.topic_id = topic_id
            self._recreated = earlier_incarnation(c.store, c.group, c.topic, topic_id, fresh)
            if self._recreated:
                log.warning(
                    "topic %s was deleted and re-created (now id %s): partitions %s start "
                    "from the beginning, their earlier state is ignored",
                    c.topic,
                    topic_id,
                    sorted(self._recreated),
                )
        # State lost, ledger kept (P4, P8): Kafka's committed offset may lie past ranges
        # whose writes the store lost with it. Re-read what Kafka retains: writing a range
        # again converges (P3), skipping one loses it.
        unsure = [p for p in fresh if p not in self._recreated]
        self._stateless = partitions_with_rows(c.store, c.topic, topic_id or "", unsure)
        if self._stateless:
            log.error(
                "partitions %s of %s have ledger rows but no ingest state (lost in a host "
                "crash without clickhouse.fsync_after_insert?): re-reading them from the "
                "start of what Kafka retains, not from its committed offset",
                sorted(self._stateless),
                c.topic,
            )
        # counted up and down, not set: instances sharing a process's metrics add up
        c.metrics.partitions_owned.inc(len(loaded.keys() - self.tracks.keys()))
        self.tracks.update(loaded)
        for p, t in loaded.items():
            if t.next_offset is not None and t.reform is None:
                self.committed[p] = t.next_offset
                # A crash between "done" and the Kafka commit leaves Kafka behind the state;
                # bring it level so lag and tooling agree with what is really done.
                self.catch_up[p] = t.next_offset
        return loaded

    def _start(self, t: Track) -> int | None:
        """Where a loaded partition resumes; None: Kafka's committed offset (never written)."""
        if t.next_offset is None and t.partition in self._recreated | self._stateless:
            # the deleted topic's committed offset means nothing; a lost state's, too little
            return OFFSET_BEGINNING
        return t.next_offset

    def _retry_unready(self) -> None:
        if not self.unready:
            return
        parts = sorted(self.unready)
        try:
            loaded = self._load(parts)
        except UNREADY as exc:
            self._transient("reading ingest state", exc, [])  # still paused; backs off
            return
        for p in parts:
            start = self._start(loaded[p])
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
                if err.code() == KafkaError._MAX_POLL_EXCEEDED:
                    # librdkafka already left the group and revoked (or lost) the partitions
                    # through on_revoke; the next poll rejoins, and whatever it is assigned
                    # resumes from ingest_state. A stall is no reason to crash.
                    log.warning("evicted from the group, rejoining: %s", err.str())
                    continue
                raise KafkaException(err)
            track = self.tracks.get(msg.partition() or 0)
            if track is not None:
                track.buffer.append(msg)
        c.metrics.events_consumed.inc(len(msgs))
        if self.catch_up:
            c.commits.commit_offsets(self.catch_up)
            self.catch_up = {}
        self._failed_now = False
        # The ledger question and the ledger write as one step among the instances on this
        # store: a copy classified after another instance's copy was written is a duplicate.
        with Turn(c.ledger_lock) as turn:
            ranges = self.ranges.make(self._transient)
            if ranges:
                self._write(ranges, turn.done)
        if self._backoff:
            c.clock.sleep(self._backoff)  # outside the lock: other instances go on
            self._backoff = 0.0
        if not self._failed_now:
            self._recovered()
        self._refresh_lag()
        return len(msgs)

    def _write(self, ranges: list[RangeWrite], ledger_written: Callable[[], None]) -> None:
        try:
            self.ctx.commits.run(ranges, int(self.ctx.clock.now() * 1000), ledger_written)
        except TRANSIENT as exc:
            # ClickHouse (or the side-output topic) is shared: pause every partition, so no
            # buffer grows while the same formed ranges wait to be classified and written
            # again.
            self._transient("write", exc, list(self.tracks))
            return
        self.ranges.written(ranges)
        self._advance(ranges)

    def _transient(self, what: str, exc: Exception, partitions: list[int]) -> None:
        """Pause the partitions, keep their data, back off; the next step retries."""
        self.healthy = False
        self._failed_now = True
        self._failures += 1
        log.warning("%s failed, pausing and retrying: %s", what, exc)
        if isinstance(exc, StoreError):
            self.ctx.metrics.clickhouse_errors.labels("ingest").inc()
        fresh = [p for p in partitions if p not in self.paused]
        if fresh:
            self.ctx.consumer.pause([TopicPartition(self.ctx.topic, p) for p in fresh])
            self.paused.update(fresh)
        self._backoff = min(MAX_BACKOFF, 0.1 * 2 ** min(self._failures, 10))

    def _recovered(self) -> None:
        """A step with no transient failure: resume whatever an earlier one paused. Partitions
        whose state is still unreadable keep it unhealthy (and /readyz failing)."""
        if self.paused:
            self.ctx.consumer.resume([TopicPartition(self.ctx.topic, p) for p in self.paused])
            self.paused.clear()
        self.healthy = not self.unready
        if self.healthy:
            self._failures = 0

    def _advance(self, ranges: Sequence[RangeWrite]) -> None:
        m = self.ctx.metrics
        now = self.ctx.clock.now()
        for r in ranges:
            t = self.tracks.get(r.partition)
            cl = r.classified
            for meter, n in cl.accepted.per_meter.items():
                m.events_accepted.labels(meter).inc(n)
            for c in cl.cancels:
                m.events_cancel.labels(c.meter.name).inc()
            for meter, n in cl.duplicates.items():
                m.events_duplicate.labels(meter).inc(n)
            for x in cl.late:
                m.events_late.labels(x.meter.name).inc()
            for d in cl.invalid:
                m.events_invalid.labels(d.reason).inc()
            m.events_duplicate_cross_partition.inc(cl.cross_partition)
            m.insert_rows.labels("usage_events").inc(len(cl.accepted))
            m.insert_rows.labels("dead_letters").inc(len(cl.invalid))
            m.insert_rows.labels("late_events").inc(len(cl.late))
            m.insert_rows.labels("cancellations").inc(len(cl.cancels))
            m.ranges_committed.inc()
            if r.attempt > 1:
                m.ranges_reformed.inc()
            m.poison_quarantined.inc(sum(d.reason == "poison" for d in cl.invalid))
            if t is not None:
                t.next_offset = r.end
                t.watermarks = dict(cl.watermarks_after)
                suspect = r.snapshot.suspect
                t.suspect = suspect if suspect and r.end < suspect[1] else None
                t.suspect_config = r.snapshot.config_hash
                self._lag(t)
        for meter, mark in self._max_watermarks().items():
            m.watermark_lag.labels(meter).set(max(0.0, now - mark / 1000))

    def _lag(self, t: Track, ask: bool = False) -> None:
        """Lag from the fetch-response high watermark (cached, no broker round trip); with
        `ask`, also from a ListOffsets request, the larger of the two. The cached one is
        exact while the partition is fetched, and stands still while it is paused; the
        asked one moves then, but some brokers (Tansu) answer the last batch's base offset
        + 1, short of the end by the rest of that batch, so it never replaces a larger one."""
        tp = TopicPartition(self.ctx.topic, t.partition)
        try:
            _, high = self.ctx.consumer.get_watermark_offsets(tp, cached=True)
            if ask:
                high = max(high, self.ctx.consumer.get_watermark_offsets(tp, timeout=1.0)[1])
        except KafkaException:
            return
        if high >= 0 and t.next_offset is not None:
            lag = max(0, high - t.next_offset)
            self.ctx.metrics.consumer_lag.labels(str(t.partition)).set(lag)

    def _refresh_lag(self) -> None:
        """Every partition's lag now and then, not only when a range is written: a paused
        or quiet partition's gauge would otherwise stand at its last value."""
        now = self.ctx.clock.monotonic()
        if now - self._lag_asked < LAG_EVERY:
            return
        self._lag_asked = now
        for t in self.tracks.values():
            self._lag(t, ask=True)

    def _max_watermarks(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tracks.values():
            for meter, mark in t.watermarks.items():
                out[meter] = max(out.get(meter, mark), mark)
        return out
