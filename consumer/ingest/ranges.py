"""Range making: form each partition's next range, record its intent, then classify it.

The intent is durable before anything is decided about the records (P1), so a message that
crashes decoding is counted against its range and eventually found (P7); once a re-formed
range is classified its attempt is withdrawn, so later crashes are not held against it.
A transient failure keeps the formed range, with its snapshot, for the next try.
"""

from __future__ import annotations

import logging

from confluent_kafka import TopicPartition

from consumer.classify.classifier import Classified, Classifier, Job
from consumer.config import parse_classification
from consumer.decode.validate import DAY_MS, Limits
from consumer.ingest.context import TRANSIENT, IngestContext, OnTransient
from consumer.intent.forming import Formed, form
from consumer.intent.tracks import Track
from consumer.sinks.ledger import RangeWrite, ledger_lookup
from consumer.sinks.side_outputs import redriven
from consumer.store import releases
from consumer.store.backend import StoreUnavailable
from consumer.store.config_versions import load_config

log = logging.getLogger(__name__)


class UnknownConfiguration(Exception):
    """A bug or a wiped store: an intent names a configuration nobody recorded."""


class DeadLetterFlood(Exception):
    """Most of a large range is invalid: a producer or schema is broken. Stop loudly rather
    than dead-letter everything; nothing of the range is written or committed. An operator
    lets exactly this range through with `usage-consumer dlq release` (store/releases.py)."""

    def __init__(self, message: str, partition: int, start: int, end: int) -> None:
        super().__init__(message)
        self.partition, self.start, self.end = partition, start, end


class RangeMaker:
    """Turns the owned partitions' buffered records into classified ranges."""

    def __init__(self, ctx: IngestContext, tracks: dict[int, Track]) -> None:
        self.ctx = ctx
        self.tracks = tracks  # shared with the consume loop
        self.formed: dict[int, Formed] = {}
        self._classifiers: dict[str, Classifier] = {}

    def forget(self, partitions: set[int]) -> None:
        """Revoked partitions: their formed ranges are dropped uncommitted (re-read later)."""
        self.formed = {p: f for p, f in self.formed.items() if p not in partitions}

    def make(self, transient: OnTransient) -> list[RangeWrite]:
        """Form each partition's next range, record the intents, then classify (P1, P7)."""
        c = self.ctx
        now_ms = int(c.clock.now() * 1000)
        pending = [
            t
            for t in self.tracks.values()
            if (t.buffer or t.reform) and t.partition not in self.formed
        ]
        if pending:
            tps = [TopicPartition(c.topic, t.partition) for t in pending]
            positions = {
                int(tp.partition or 0): int(tp.offset or -1) for tp in c.consumer.position(tps)
            }
            for t in pending:
                f = form(
                    t,
                    c.topic,
                    positions.get(t.partition, -1),
                    c.config_hash,
                    now_ms,
                    c.poison_after_attempts,
                    c.commits.topic_id,
                )
                if f is None:
                    continue
                # Nothing reads the records before the intent is durable (P7): their
                # schema ids are read while classifying and recorded with the range's done.
                t.buffer = [m for m in t.buffer if (m.offset() or 0) >= f.end]
                self.formed[t.partition] = f
        batch = self._batch()
        if not self._intend([f for f in batch if not f.intended], now_ms, transient):
            return []
        try:
            classified = self._classify(batch)
        except TRANSIENT as exc:
            transient("classification", exc, [f.partition for f in batch])
            return []
        ranges = []
        for f, cl in zip(batch, classified, strict=True):
            try:
                self._check_flood(f, cl)
            except StoreUnavailable as exc:  # asking for a release, or withdrawing the attempt
                transient("flood check", exc, [f.partition])
                return []
            if (f.attempt > 1 or f.snapshot.suspect is not None) and not f.quarantine:
                try:  # a suspect range goes alone, so this is the batch's only write
                    c.commits.withdraw(f, now_ms)
                except StoreUnavailable as exc:
                    transient("intent", exc, [f.partition])
                    return []
            ranges.append(
                RangeWrite(c.topic, f.partition, f.start, f.end, f.attempt, f.snapshot, cl)
            )
        return ranges

    def written(self, ranges: list[RangeWrite]) -> None:
        """The ranges' writes are durable: their partitions form their next ranges. Until
        then a formed range stays, and a write that failed is classified again on the next
        try (its intent stands), so it sees whatever other instances wrote meanwhile."""
        for r in ranges:
            self.formed.pop(r.partition, None)

    def _batch(self) -> list[Formed]:
        """The ranges to write together. A suspect one (re-formed after a crash, or a chunk
        of a poison search) goes alone, so that a crash while it is open is counted
        against it only: a poison message in one partition never gets an innocent offset
        of another partition quarantined (P7)."""
        formed = sorted(self.formed.values(), key=lambda f: f.partition)
        for f in formed:
            if f.attempt > 1 or f.snapshot.suspect is not None or f.quarantine:
                return [f]
        return formed

    def _intend(self, new: list[Formed], now_ms: int, transient: OnTransient) -> bool:
        if not new:
            return True
        try:
            self.ctx.commits.intend(new, now_ms)
        except StoreUnavailable as exc:
            transient("intent", exc, list(self.tracks))
            return False
        for f in new:
            f.intended = True
            t = self.tracks.get(f.partition)
            if t is not None:
                t.reform = None  # superseded by the intent just written
            if f.quarantine:
                log.error(
                    "partition %d offset %d crashed the consumer %d times: quarantining it "
                    "as a dead letter (reason poison)",
                    f.partition,
                    f.start,
                    f.attempt - 1,
                )
            elif f.snapshot.suspect is not None and f.attempt == 1:
                log.warning(
                    "partition %d: searching [%d, %d) for a message that crashes the consumer; "
                    "trying [%d, %d)",
                    f.partition,
                    *f.snapshot.suspect,
                    f.start,
                    f.end,
                )
        return True

    def _classify(self, batch: list[Formed]) -> list[Classified]:
        """The batch's ranges, classified with one ledger question per configuration."""
        out: dict[int, Classified] = {}
        groups: dict[str, list[Formed]] = {}
        for f in batch:
            if f.quarantine:
                out[f.partition] = Classifier.quarantine(f.inp, f.snapshot, f.attempt - 1)
            else:
                groups.setdefault(f.snapshot.config_hash, []).append(f)
        lookup = ledger_lookup(self.ctx.store, self.ctx.dedup_window_ms)
        for config_hash, formed in groups.items():
            classifier = self._classifier_for(config_hash, formed[0].partition)
            jobs = [Job(f.inp, f.start, f.end, f.snapshot) for f in formed]
            for f, cl in zip(formed, classifier.classify_all(jobs, lookup), strict=True):
                out[f.partition] = cl
        return [out[f.partition] for f in batch]

    def _check_flood(self, f: Formed, classified: Classified) -> None:
        """Stops on a range that is mostly invalid, unless an operator released it. Re-driven
        copies (`dlq redrive`) that fail again are not a broken producer: they do not count."""
        c = self.ctx
        bad = sum(1 for d in classified.invalid if not redriven(d.record))
        n = len(f.inp)
        if n < c.flood_min_messages or bad <= c.max_invalid_ratio * n:
            return
        released = releases.covering(c.store, c.topic, f.partition, f.start, f.end - 1)
        if released is not None:
            log.warning(
                "partition %d offsets %d-%d: %d of %d messages invalid; dead-lettering them, "
                "released by %s (%s)",
                f.partition,
                f.start,
                f.end - 1,
                bad,
                n,
                released.who or "?",
                released.reason or "no reason given",
            )
            return
        # A deliberate stop, not a crash: withdraw this attempt so that restarts waiting
        # for an operator never count towards splitting the range as poison (P7).
        c.commits.withdraw(f, int(c.clock.now() * 1000))
        reasons = sorted({d.reason for d in classified.invalid})
        raise DeadLetterFlood(
            f"partition {f.partition} offsets {f.start}-{f.end - 1}: {bad} of {n} "
            f"messages invalid ({', '.join(reasons)}); stopped instead of dead-lettering "
            "them all (pipeline.max_invalid_ratio)",
            f.partition,
            f.start,
            f.end,
        )

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
