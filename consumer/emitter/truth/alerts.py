"""The outbox backlog as metrics, and a loud log before usage reaches Stripe's 35-day limit.

Reported on every cycle, also while Stripe fails: a growing backlog is what alerts watch,
and pushes past the limit can no longer be billed as they are.
"""

from __future__ import annotations

import logging

from consumer.emitter.truth import standing
from consumer.emitter.truth.delivery import DAY_MS, DeliveryPolicy
from consumer.metrics import Metrics
from consumer.store.backend import Backend

# The emitter's messages keep one logger name: log settings and alerts select on it.
log = logging.getLogger("consumer.emitter.loop")
ALERT_EVERY_MS = 600_000  # the loud near-limit log repeats at most this often


class BacklogAlerts:
    def __init__(self, store: Backend, policy: DeliveryPolicy, metrics: Metrics) -> None:
        self._store = store
        self._policy = policy
        self._metrics = metrics
        self._next_alert_ms = 0

    def report(self, now_ms: int) -> None:
        b = standing.backlog(self._store, now_ms - self._policy.alert_age_ms)
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
