"""Delivery marks: each request's pushes are marked sent right after its 2xx.

A delivered push without its mark looks unknown to the outbox: it is sent again while
Stripe remembers its identifier, and after that only an event-summary check can settle it.
So when a mark cannot be written the marks are kept here and sending stops (MarksBlocked)
until a later cycle writes them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from consumer.clock import Clock
from consumer.emitter.plan import outbox
from consumer.emitter.plan.outbox import SENT, Push
from consumer.metrics import Metrics
from consumer.store.backend import Backend, StoreUnavailable

# The emitter's messages keep one logger name: log settings and alerts select on it.
log = logging.getLogger("consumer.emitter.loop")


class MarksBlocked(StoreUnavailable):
    """Delivered pushes could not be marked; nothing is sent until their marks are written."""


class Marks:
    def __init__(self, store: Backend, clock: Clock, metrics: Metrics) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._unmarked: list[Push] = []  # delivered, mark not yet written

    def flush(self, now_ms: int) -> None:
        """Sending resumes only once the marks of what was already delivered are written."""
        if not self._unmarked:
            return
        try:
            outbox.write(self._store, self._unmarked, SENT, now_ms)
        except StoreUnavailable as exc:
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

    def write(self, delivered: Sequence[Push]) -> bool:
        """Mark `delivered` sent; False if the marks are kept for later (sending must stop)."""
        marks = list(delivered)  # written at rank SENT
        if not self._unmarked:
            try:
                outbox.write(self._store, marks, SENT, int(self._clock.now() * 1000))
                self._count_emitted(marks)
                return True
            except StoreUnavailable as exc:
                self._metrics.stripe_mark_failures.inc()
                self._metrics.stripe_sends_paused.set(1)
                log.error(
                    "Stripe accepted %d events but their marks cannot be written; "
                    "sending paused until a mark succeeds: %s",
                    len(marks),
                    exc,
                )
        self._unmarked += marks
        return False

    def raise_if_kept(self) -> None:
        """End a batch that left marks unwritten the way the next cycle would: blocked."""
        if self._unmarked:
            raise MarksBlocked(f"{len(self._unmarked)} delivery marks unwritten")

    def _count_emitted(self, pushes: Sequence[Push]) -> None:
        for mode, n in Counter(p.mode for p in pushes).items():
            self._metrics.stripe_events.labels(mode).inc(n)
