"""Pushes that crash the emitter (P7 for the outbox): found by sending suspects alone,
set aside for a person after `limit` crashes, while every other push is delivered.

A push whose send crashes the process (a value the sender cannot encode, a bug, a kill)
stays attempted with no answer, and every restart sends it again: without this the
process would crash-loop and bill nobody. Each push's count of sends that got no answer
lives in its own outbox row (its `reason` ends `unanswered sends: N`), written before
the send it counts, in the insert that writes the batch's first attempts. So, as P7 does
for ranges:

  - after a restart (or a new emitter lease), the attempted pushes it finds were in
    flight when their sender died (or failed): they are sent again as they were, each
    counted once; an ordinary crash ends there, at no cost;
  - a push found counted (its batch crashed again) is a *suspect*: sent alone, its count
    up by one just before, and nothing new starts while suspects wait. An answer
    (delivered, or failed: SendFailed) ends the suspicion; a failure puts the count back;
  - a push found with `limit` unanswered sends (the last `limit - 1` alone) is set aside:
    held as rejected with the reason `quarantined: ...` (usage-consumer totals lists it;
    the held alert fires), never sent again by itself; `usage-consumer push release
    IDENTIFIER` gives it back.

An innocent push is set aside only if the process dies `limit - 1` times while it alone
is in flight. Isolation costs one insert and one request per suspect (about 0.1 s here),
only after two crashes in a row of the same in-flight batch, bounded by one cycle's batch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from consumer.emitter.plan import outbox
from consumer.emitter.plan.outbox import REJECTED, Push
from consumer.metrics import Metrics
from consumer.store.backend import Backend, StoreUnavailable

log = logging.getLogger("consumer.emitter.loop")

_COUNT = re.compile(r"(?:; )?unanswered sends: (\d+)$")
QUARANTINED = "quarantined"  # the start of a quarantined push's reason


def unanswered(p: Push) -> int:
    """Sends of `p` alone that never got an answer (the process died meanwhile)."""
    m = _COUNT.search(p.reason)
    return int(m.group(1)) if m else 0


def with_count(p: Push, n: int) -> Push:
    """`p` with its count of unanswered sends set to `n` (none at 0), its reason kept."""
    base = _COUNT.sub("", p.reason)
    if n <= 0:
        return p._replace(reason=base)
    return p._replace(reason=f"{base}; unanswered sends: {n}" if base else f"unanswered sends: {n}")


@dataclass
class Screened:
    alone: list[Push]  # suspects: each sent by itself
    again: list[Push]  # left in flight by a dead sender: sent as they were, counted once
    rest: list[Push]
    aside: int  # how many were set aside now


class Suspects:
    """Which attempted pushes are sent alone, and which are set aside."""

    def __init__(self, store: Backend, metrics: Metrics, limit: int) -> None:
        self._store = store
        self._metrics = metrics
        self._limit = max(1, limit)
        self._restarted = True  # the first cycles after a start or a new lease

    def held_anew(self) -> None:
        """Another process may have died sending: what it left attempted is suspect."""
        self._restarted = True

    def screen(self, batch: list[Push], now_ms: int) -> Screened:
        """What may be sent now, as read (before first attempts are written), sorted;
        pushes with `limit` unanswered sends are set aside here."""
        out = Screened([], [], [], 0)
        aside = []
        for p in batch:
            n = unanswered(p)
            if not p.attempted or (n == 0 and not self._restarted):
                out.rest.append(p)
            elif n >= self._limit:
                aside.append(p)
            elif n >= 1:
                out.alone.append(p)
            else:
                out.again.append(with_count(p, 1))
        if aside:
            self._set_aside(aside, now_ms)
            out.aside = len(aside)
        if not out.alone and not out.again:
            self._restarted = False  # nothing left from a dead sender
        return out

    def send_alone(
        self,
        p: Push,
        send: Callable[[Push], object],
        now_ms: int,
        answered: tuple[type[BaseException], ...],
    ) -> None:
        """Count the send in `p`'s row (durable first), then send it by itself. A failure
        the emitter retries (`answered`: Stripe failing, the store away) is no crash: the
        count goes back. Any other exception ends the process with the count standing."""
        n = unanswered(p)
        outbox.write_moved(self._store, [with_count(p, n + 1)], now_ms)
        try:
            send(with_count(p, 0))
        except answered:
            outbox.write_moved(self._store, [with_count(p, n)], now_ms)
            raise

    def answered(self, pushes: list[Push], now_ms: int) -> None:
        """A batch holding `pushes` (counted once) failed with an answer: no crash, so the
        count goes back (best effort: left standing, they are only sent alone later)."""
        if not pushes:
            return
        try:
            outbox.write_moved(self._store, [with_count(p, 0) for p in pushes], now_ms)
        except StoreUnavailable as exc:
            log.warning("%d unanswered-send counts stay up: %s", len(pushes), exc)

    def _set_aside(self, pushes: list[Push], now_ms: int) -> None:
        held = [
            with_count(p, 0).moved(
                REJECTED,
                reason=f"{QUARANTINED}: {unanswered(p)} sends got no answer (the emitter "
                "crashed sending it); held for a person (usage-consumer push release)",
            )
            for p in pushes
        ]
        outbox.write(self._store, held, REJECTED, now_ms)
        self._metrics.stripe_quarantined.inc(len(held))
        for p in pushes:
            log.error(
                "push %s (meter %s, customer %s, bucket %d): %d sends got no answer (the "
                "emitter crashed): quarantined, held for a person; every other push is sent",
                p.identifier,
                p.meter,
                p.customer_id,
                p.bucket_ms,
                unanswered(p),
            )
