"""Settling unknown outcomes from Stripe's event summaries, once a blind re-send is unsafe.

Past `verify_after` Stripe may have forgotten a push's identifier, so a re-send could bill
it twice. Each minute holding such pushes is checked against its summary (delivery.judge):
what landed is marked sent, what verifiably did not gets a fresh first attempt (and is sent
again, or meets the 35-day limit), and what the summary cannot tell is held and checked
again later. Checks are rate-limited reads, so only a few minutes are checked per cycle.
"""

from __future__ import annotations

import logging

import stripe

from consumer.emitter.plan import outbox
from consumer.emitter.plan.outbox import ATTEMPTED, REDATED, SENT
from consumer.emitter.send.sender import rfc3339
from consumer.emitter.truth import minutes
from consumer.emitter.truth.delivery import DeliveryPolicy, Landed, judge
from consumer.emitter.truth.minutes import BucketKey
from consumer.emitter.truth.summaries import SummaryReader
from consumer.emitter.truth.too_old import Limits
from consumer.metrics import Metrics
from consumer.store.backend import Backend

# The emitter's messages keep one logger name: log settings and alerts select on it.
log = logging.getLogger("consumer.emitter.loop")
CHECKS_PER_CYCLE = 20  # minutes checked against event summaries per cycle
RECHECK_MIN_MS = 60_000


class Verifier:
    def __init__(
        self,
        store: Backend,
        summaries: SummaryReader,
        policy: DeliveryPolicy,
        metrics: Metrics,
        limits: Limits,
    ) -> None:
        self._store = store
        self._summaries = summaries
        self._policy = policy
        self._metrics = metrics
        self._limits = limits
        self._recheck: dict[BucketKey, int] = {}  # minute -> when to check it again
        self._unverifiable: dict[BucketKey, int] = {}  # minute -> unknown pushes held

    def check_due(self, now_ms: int) -> int:
        """Settle minutes whose unknown pushes are too old for a blind re-send: mark what
        landed, give what verifiably did not a fresh first attempt (so it is sent again), hold
        what the summary cannot tell. Returns how many pushes were decided."""
        policy = self._policy
        keys = minutes.due_buckets(
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
        rows = minutes.bucket_rows(self._store, key)
        unknown = [p for p in rows if p.attempted]
        recent = now_ms - policy.settle_ms
        if any(p.status in outbox.DELIVERED and p.updated_ms > recent for p in rows):
            # a recent delivery may not be in the summary yet
            self._recheck[key] = now_ms + max(policy.settle_ms, RECHECK_MIN_MS)
            return 0
        try:
            account = next((p.account for p in rows if p.account), "")  # a customer's one
            meter = self._summaries.meter(key.stripe_event_name, account)
            if meter is None:
                self._hold(key, len(unknown), now_ms, "Stripe has no meter for this event name")
                return 0
            summary = self._summaries.minute_total(meter, key.customer_id, key.minute_ms, account)
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
        self._limits.reached(late, now_ms)
        return len(landed) + len(absent)
