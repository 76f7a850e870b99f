"""Stripe's 35-day timestamp limit: usage older than that is refused, so it is never sent.

By `stripe.past_limit_policy` such usage is held as expired (the default: a person decides)
or re-dated to the oldest timestamp Stripe accepts, with a fresh first attempt, as Stripe
has never seen the new timestamp. Ranks never go down, so a re-dated push that falls past
the limit again under the hold policy stays pending rather than becoming expired.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from consumer.emitter.plan import outbox
from consumer.emitter.plan.outbox import EXPIRED, REDATED, Push
from consumer.emitter.plan.units import Assigner
from consumer.emitter.send.sender import rfc3339
from consumer.emitter.truth.delivery import DeliveryPolicy
from consumer.metrics import Metrics
from consumer.store.backend import Backend

# The emitter's messages keep one logger name: log settings and alerts select on it.
log = logging.getLogger("consumer.emitter.loop")


class Limits:
    def __init__(
        self, store: Backend, policy: DeliveryPolicy, metrics: Metrics, assigner: Assigner
    ) -> None:
        self._store = store
        self._assigner = assigner
        self._policy = policy
        self._metrics = metrics

    def past_limit(self, now_ms: int, limit: int) -> int:
        """Never-sent pushes Stripe would refuse: held as expired, or re-dated by policy (then
        also the ones held earlier)."""
        rows = outbox.past_limit(
            self._store,
            self._policy.limit_ms(now_ms),
            self._policy.past_limit_policy == "redate",
            limit,
        )
        self.reached(rows, now_ms)
        return len(rows)

    def reached(self, rows: Sequence[Push], now_ms: int) -> None:
        """Hold `rows` as expired, or re-date them (with a fresh first attempt) by policy."""
        if not rows:
            return
        oldest = rfc3339(min(p.timestamp_ms for p in rows))
        if self._policy.past_limit_policy == "hold":
            self._hold(rows, oldest, now_ms)
        else:
            self._redate(rows, oldest, now_ms)

    def _hold(self, rows: Sequence[Push], oldest: str, now_ms: int) -> None:
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

    def _redate(self, rows: Sequence[Push], oldest: str, now_ms: int) -> None:
        target = self._policy.redate_ms(now_ms)
        moved = [
            p.moved(p.status, stripe_ms=target, reason=f"redated from {rfc3339(p.bucket_ms)}")
            for p in rows
        ]
        # A fresh first attempt: Stripe never saw the new timestamp. Amounts are fixed now.
        redated = self._assigner.assign(moved, REDATED, now_ms)
        outbox.write_moved(self._store, redated, now_ms)
        self._metrics.stripe_past_limit.labels("redated").inc(len(redated))
        log.warning(
            "%d Stripe pushes (oldest %s) were past Stripe's 35-day limit: re-dated to %s "
            "(stripe.past_limit_policy=redate)",
            len(redated),
            oldest,
            rfc3339(target),
        )
