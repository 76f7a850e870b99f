"""The emitter loop: read Stripe's error reports, plan aggregated intents, settle unknown
outcomes, hold or re-date usage past Stripe's 35-day limit, send pending pushes
concurrently, and mark each request after its 2xx. A Stripe outage only grows the outbox;
ingestion never waits on it.

A cycle, in order:
  1. write marks left over from a cycle whose marks failed; until that works, send nothing
  2. mark rows that Stripe's error reports rejected (a 2xx is not billing)
  3. plan aggregated deltas as new intents
  4. check minutes with unknown outcomes past `verify_after` against event summaries
  5. hold (or, by policy, re-date) never-sent pushes past the 35-day limit
  6. record first_attempt_at for pushes about to be sent for the first time
  7. send; mark each request's rows after its 2xx; a failed mark stops the other requests
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from decimal import Decimal

import stripe

from consumer.clock import Clock
from consumer.config import MeterConfig, StripeConfig
from consumer.emitter import outbox
from consumer.emitter.delivery import DAY_MS, DeliveryPolicy, Landed, judge
from consumer.emitter.outbox import (
    ATTEMPTED,
    EXPIRED,
    REDATED,
    REJECTED,
    SENT,
    BucketKey,
    Push,
)
from consumer.emitter.reports import ErrorReportReader
from consumer.emitter.sender import Sender, SendFailed, rfc3339
from consumer.emitter.summaries import SummaryReader
from consumer.faults import fault_point
from consumer.metrics import Metrics
from consumer.store.backend import Backend, StoreError

log = logging.getLogger(__name__)
REPORT_LOOKBACK_MS = 30 * DAY_MS  # Stripe lists events for 30 days
CHECKS_PER_CYCLE = 20  # minutes checked against event summaries per cycle
ALERT_EVERY_MS = 600_000  # the loud near-limit log repeats at most this often
RECHECK_MIN_MS = 60_000


class MarksBlocked(StoreError):
    """Delivered pushes could not be marked; nothing is sent until their marks are written."""


class Emitter:
    def __init__(
        self,
        store: Backend,
        sender: Sender,
        meters: list[MeterConfig],
        clock: Clock,
        metrics: Metrics,
        concurrency: int,
        per_request: int,
        lookback_days: int,
        poll_interval: float,
        config: StripeConfig | None = None,
    ) -> None:
        self._store = store
        self._sender = sender
        self._aggregated = [m for m in meters if m.stripe_event_name and m.emission == "aggregated"]
        self._clock = clock
        self._metrics = metrics
        self._per_request = per_request
        self._lookback_ms = lookback_days * DAY_MS
        self._poll = poll_interval
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="stripe")
        self._concurrency = concurrency
        self._policy = DeliveryPolicy.from_config(config or StripeConfig())
        self._summaries = SummaryReader(sender.api, sender.pace)
        self._reports = ErrorReportReader(sender.api, self._now_ms() - REPORT_LOOKBACK_MS)
        self._next_reports_ms = 0
        self._next_alert_ms = 0
        self._unmarked: list[Push] = []  # delivered, mark not yet written
        self._halt = threading.Event()
        self._recheck: dict[BucketKey, int] = {}  # minute -> when to check it again
        self._unverifiable: dict[BucketKey, int] = {}  # minute -> unknown pushes held
        self.cycles = 0
        self.stopping = threading.Event()
        self.last_idle_cycle = 0

    def _now_ms(self) -> int:
        return int(self._clock.now() * 1000)

    def run_once(self) -> int:
        """One cycle; returns how much it did (0 = nothing to do)."""
        self.cycles += 1
        cycle = self.cycles
        now_ms = self._now_ms()
        self._flush_marks(now_ms)
        work = self._take_reports(now_ms)
        planned = []
        for meter in self._aggregated:
            planned += outbox.plan_aggregated(self._store, meter, now_ms - self._lookback_ms)
        outbox.write(self._store, planned, outbox.PENDING, now_ms)
        work += len(planned)
        limit = self._per_request * self._concurrency * 4
        work += self._check_due(now_ms) + self._past_limit(now_ms, limit)
        # Re-sends the checks allowed and re-dated pushes carry a fresh first attempt now,
        # so they come back with the rest of what may be sent.
        batch = outbox.sendable(
            self._store,
            self._policy.limit_ms(now_ms),
            self._policy.blind_after_ms(now_ms),
            limit,
        )
        fresh = [p.moved(ATTEMPTED, first_attempt_ms=now_ms) for p in batch if not p.attempted]
        outbox.write(self._store, fresh, ATTEMPTED, now_ms)  # first_attempt_at, before sending
        recorded = {p.identifier: p for p in fresh}
        to_send = [recorded.get(p.identifier, p) for p in batch]
        work += len(to_send)
        self._report(now_ms)
        try:
            self._send(to_send)
        finally:
            # also while Stripe fails: the backlog is what alerts watch
            self._report(self._now_ms())
        if not work:
            self.last_idle_cycle = cycle
        self._metrics.stripe_idle.set(0 if work else 1)
        return work

    # -- 1 and 7: marks ---------------------------------------------------------------------

    def _flush_marks(self, now_ms: int) -> None:
        """Sending resumes only once the marks of what was already delivered are written."""
        if not self._unmarked:
            return
        try:
            outbox.write(self._store, self._unmarked, SENT, now_ms)
        except StoreError as exc:
            self._metrics.stripe_mark_failures.inc()
            log.error(
                "still cannot write %d Stripe delivery marks; sending stays paused: %s",
                len(self._unmarked),
                exc,
            )
            raise MarksBlocked(f"{len(self._unmarked)} delivery marks unwritten") from exc
        self._count_emitted(self._unmarked)
        log.warning("%d delivery marks written; sending resumes", len(self._unmarked))
        self._unmarked = []
        self._metrics.stripe_sends_paused.set(0)

    def _mark(self, delivered: Sequence[Push]) -> None:
        marks = [p.moved(SENT) for p in delivered]
        if not self._unmarked:
            try:
                outbox.write(self._store, marks, SENT, self._now_ms())
                self._count_emitted(marks)
                return
            except StoreError as exc:
                self._metrics.stripe_mark_failures.inc()
                self._metrics.stripe_sends_paused.set(1)
                log.error(
                    "Stripe accepted %d events but their marks cannot be written; "
                    "sending paused until a mark succeeds: %s",
                    len(marks),
                    exc,
                )
        self._halt.set()  # requests not yet started are skipped
        self._unmarked += marks

    def _count_emitted(self, pushes: Sequence[Push]) -> None:
        for p in pushes:
            self._metrics.stripe_events.labels(p.mode).inc()

    def _send_unless_stopping(self, chunk: list[Push]) -> list[Push]:
        """On shutdown or a failed mark, requests not yet started are skipped (they stay
        pending, attempted)."""
        if self.stopping.is_set() or self._halt.is_set():
            return []
        return self._sender.send(chunk)

    def _send(self, batch: list[Push]) -> None:
        self._halt.clear()
        chunks = [batch[i : i + self._per_request] for i in range(0, len(batch), self._per_request)]
        futures: list[Future[list[Push]]] = [
            self._pool.submit(self._send_unless_stopping, c) for c in chunks
        ]
        failure: BaseException | None = None
        for done, fut in enumerate(as_completed(futures)):
            if done == 1:
                fault_point("stripe_mid_batch")  # some requests answered, some in flight
            try:
                delivered = fut.result()
            except SendFailed as exc:
                failure = exc
                continue
            if delivered:
                fault_point("after_stripe_2xx")
                self._mark(delivered)
        if self._unmarked:
            raise MarksBlocked(f"{len(self._unmarked)} delivery marks unwritten")
        if failure is not None:
            raise failure

    # -- 2: error reports -------------------------------------------------------------------

    def _take_reports(self, now_ms: int) -> int:
        """Mark the pushes Stripe's error reports name as rejected, with the reason."""
        if now_ms < self._next_reports_ms:
            return 0
        self._next_reports_ms = now_ms + self._policy.report_interval_ms
        try:
            batch = self._reports.fetch()
        except (stripe.StripeError, ValueError) as exc:
            log.warning("cannot read Stripe error reports, retrying later: %s", exc)
            return 0
        if batch.unidentified:
            self._metrics.stripe_rejections_unidentified.inc(batch.unidentified)
            log.error(
                "Stripe reported %d rejected meter events without naming them: "
                "reconcile against event summaries",
                batch.unidentified,
            )
        why = {r.identifier: f"{r.code}: {r.message}" for r in batch.rejections}
        code = {r.identifier: r.code for r in batch.rejections}
        ids = sorted(why)
        rows: list[Push] = []
        for i in range(0, len(ids), 1000):
            rows += outbox.by_identifier(self._store, ids[i : i + 1000])
        rejected = [
            p.moved(REJECTED, reason=why[p.identifier]) for p in rows if p.status != REJECTED
        ]
        outbox.write(self._store, rejected, REJECTED, now_ms)
        self._reports.advance(batch)
        for p in rejected:
            self._metrics.stripe_rejected.labels(code[p.identifier]).inc()
        if rejected:
            value = sum((p.value for p in rejected), Decimal(0))
            log.error(
                "Stripe rejected %d meter events after a 2xx (value %s, codes %s): marked "
                "rejected, NOT billed; see the stripe_delivery view. First: %s",
                len(rejected),
                value,
                ", ".join(sorted({code[p.identifier] for p in rejected})),
                "; ".join(f"{p.identifier} ({p.reason})" for p in rejected[:5]),
            )
        return len(rejected)

    # -- 4: unknown outcomes ----------------------------------------------------------------

    def _check_due(self, now_ms: int) -> int:
        """Settle minutes whose unknown pushes are too old for a blind re-send: mark what
        landed, give what verifiably did not a fresh first attempt (so it is sent again), hold
        what the summary cannot tell. Returns how many pushes were decided."""
        policy = self._policy
        keys = outbox.due_buckets(
            self._store,
            policy.due_ms(now_ms),
            policy.limit_ms(now_ms) - policy.settle_ms,
            CHECKS_PER_CYCLE + len(self._recheck),
        )
        waiting = set(keys)
        for key in list(self._unverifiable):
            if key not in waiting:  # settled some other way (a late mark, a report)
                del self._unverifiable[key]
                self._recheck.pop(key, None)
        decided = checked = 0
        for key in keys:
            if checked >= CHECKS_PER_CYCLE:
                break
            if self._recheck.get(key, 0) > now_ms:
                continue
            checked += 1
            decided += self._check(key, now_ms)
        self._metrics.stripe_held.labels("unverifiable").set(sum(self._unverifiable.values()))
        return decided

    def _hold(self, key: BucketKey, unknown: int, now_ms: int, why: str) -> None:
        self._unverifiable[key] = unknown
        self._recheck[key] = now_ms + max(self._policy.settle_ms, RECHECK_MIN_MS)
        self._metrics.stripe_verifications.labels("ambiguous").inc(unknown)
        log.error(
            "held %d Stripe pushes of %s for %s at %s: their outcome is unknown and the event "
            "summary cannot tell (%s); not re-sent, to avoid billing twice",
            unknown,
            key.stripe_event_name,
            key.customer_id,
            rfc3339(key.minute_ms),
            why,
        )

    def _check(self, key: BucketKey, now_ms: int) -> int:
        policy = self._policy
        rows = outbox.bucket_rows(self._store, key)
        unknown = [p for p in rows if p.attempted]
        recent = now_ms - policy.settle_ms
        if any(p.status in outbox.DELIVERED and p.updated_ms > recent for p in rows):
            # a recent delivery may not be in the summary yet
            self._recheck[key] = now_ms + max(policy.settle_ms, RECHECK_MIN_MS)
            return 0
        try:
            meter = self._summaries.meter(key.stripe_event_name)
            if meter is None:
                self._hold(key, len(unknown), now_ms, "Stripe has no meter for this event name")
                return 0
            summary = self._summaries.minute_total(meter, key.customer_id, key.minute_ms)
        except stripe.StripeError as exc:
            log.warning("cannot read Stripe event summaries, retrying later: %s", exc)
            self._recheck[key] = now_ms + RECHECK_MIN_MS
            return 0
        verdict = judge(summary, rows, meter.formula, meter.time_window)
        if not isinstance(verdict, Landed):
            self._hold(key, len(unknown), now_ms, verdict.reason)
            return 0
        self._unverifiable.pop(key, None)
        self._recheck.pop(key, None)
        landed = [
            p.moved(SENT, reason="confirmed by event summary")
            for p in unknown
            if p.identifier in verdict.identifiers
        ]
        outbox.write(self._store, landed, SENT, now_ms)
        self._metrics.stripe_verifications.labels("landed").inc(len(landed))
        due_ms, limit_ms = policy.due_ms(now_ms), policy.limit_ms(now_ms)
        # Only pushes whose last send has settled: a non-due one may still be in flight.
        absent = [
            p
            for p in unknown
            if p.identifier not in verdict.identifiers
            and (p.first_attempt_ms <= due_ms or p.timestamp_ms < limit_ms - policy.settle_ms)
        ]
        self._metrics.stripe_verifications.labels("absent").inc(len(absent))
        if landed or absent:
            log.info(
                "checked %s for %s at %s against its event summary: %d landed, %d to re-send",
                key.stripe_event_name,
                key.customer_id,
                rfc3339(key.minute_ms),
                len(landed),
                len(absent),
            )
        late = [p for p in absent if p.timestamp_ms < limit_ms]
        again = [
            p.moved(REDATED if p.status == REDATED else ATTEMPTED, first_attempt_ms=now_ms)
            for p in absent
            if p.timestamp_ms >= limit_ms
        ]
        outbox.write_moved(self._store, again, now_ms)  # a new first attempt: Stripe has none
        self._limit_reached(late, now_ms)
        return len(landed) + len(absent)

    # -- 5: Stripe's 35-day limit -----------------------------------------------------------

    def _past_limit(self, now_ms: int, limit: int) -> int:
        """Never-sent pushes Stripe would refuse: held as expired, or re-dated by policy (then
        also the ones held earlier)."""
        rows = outbox.past_limit(
            self._store,
            self._policy.limit_ms(now_ms),
            self._policy.past_limit_policy == "redate",
            limit,
        )
        self._limit_reached(rows, now_ms)
        return len(rows)

    def _limit_reached(self, rows: Sequence[Push], now_ms: int) -> None:
        """Hold `rows` as expired, or re-date them (with a fresh first attempt) by policy."""
        if not rows:
            return
        oldest = rfc3339(min(p.timestamp_ms for p in rows))
        if self._policy.past_limit_policy == "hold":
            stuck = [p for p in rows if p.status == REDATED]  # ranks never go down
            if stuck:
                log.error(
                    "%d re-dated Stripe pushes are past the 35-day limit again and the policy "
                    "is now hold; they stay pending",
                    len(stuck),
                )
            held = [
                p.moved(EXPIRED, reason=f"past Stripe's 35-day limit: {rfc3339(p.timestamp_ms)}")
                for p in rows
                if p.status not in (EXPIRED, REDATED)
            ]
            outbox.write(self._store, held, EXPIRED, now_ms)
            self._metrics.stripe_past_limit.labels("held").inc(len(held))
            if held:
                log.error(
                    "%d Stripe pushes (oldest %s) are past Stripe's 35-day timestamp limit and "
                    "were NOT billed: held as expired (stripe.past_limit_policy=hold)",
                    len(held),
                    oldest,
                )
            return
        target = self._policy.redate_ms(now_ms)
        redated = [
            p.moved(
                REDATED,
                stripe_ms=target,
                first_attempt_ms=now_ms,
                reason=f"redated from {rfc3339(p.bucket_ms)}",
            )
            for p in rows
        ]
        outbox.write(self._store, redated, REDATED, now_ms)
        self._metrics.stripe_past_limit.labels("redated").inc(len(redated))
        log.warning(
            "%d Stripe pushes (oldest %s) were past Stripe's 35-day limit: re-dated to %s "
            "(stripe.past_limit_policy=redate)",
            len(redated),
            oldest,
            rfc3339(target),
        )

    # -- metrics ----------------------------------------------------------------------------

    def _report(self, now_ms: int) -> None:
        b = outbox.backlog(self._store, now_ms - self._policy.alert_age_ms)
        self._metrics.stripe_pending.set(b.pending)
        age = (now_ms - b.oldest_ms) / 1000 if b.oldest_ms else 0.0
        self._metrics.stripe_pending_age.set(age)
        self._metrics.stripe_near_limit.set(b.near_limit)
        self._metrics.stripe_held.labels("expired").set(b.expired)
        self._metrics.stripe_held.labels("rejected").set(b.rejected)
        if b.near_limit and now_ms >= self._next_alert_ms:
            self._next_alert_ms = now_ms + ALERT_EVERY_MS
            log.error(
                "%d pending Stripe pushes are older than %.0f days (oldest %.1f days): Stripe "
                "refuses timestamps older than 35 days",
                b.near_limit,
                self._policy.alert_age_ms / DAY_MS,
                age / 86400,
            )

    def drained_since(self, cycle: int) -> bool:
        """True once a cycle that started after `cycle` found nothing to plan or send."""
        return self.last_idle_cycle > cycle

    def run(self, stop: threading.Event) -> None:
        """Loop until `stop`; transient Stripe or ClickHouse failures back off and retry."""
        self.stopping = stop
        backoff = self._poll
        while not stop.is_set():
            try:
                worked = self.run_once()
                backoff = self._poll
            except (SendFailed, StoreError) as exc:
                log.warning("emitter cycle failed, retrying: %s", exc)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if not worked:
                stop.wait(self._poll)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
