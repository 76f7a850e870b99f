"""What went wrong with Stripe, in the log as well as in the metrics: retried requests
(429, 5xx, resets) and expired sessions are counted as they happen and written as one
WARN line a period, with the counts, so a flapping Stripe neither floods the log nor goes
unseen by someone reading it."""

from __future__ import annotations

import logging
import threading
from collections import Counter

from consumer.clock import Clock

log = logging.getLogger(__name__)


class Trouble:
    def __init__(self, clock: Clock, every_seconds: float = 30.0) -> None:
        self._clock = clock
        self._every = every_seconds
        self._lock = threading.Lock()  # noted from the sending threads
        self._counts: Counter[str] = Counter()
        self._since = clock.monotonic()

    def note(self, what: str) -> None:
        """One request that must be retried, by cause (a status, an error class)."""
        with self._lock:
            self._counts[what] += 1

    def report(self) -> None:
        """Write the counts once a period has passed since the last line (none without any)."""
        now = self._clock.monotonic()
        with self._lock:
            if now - self._since < self._every:
                return
            counts, self._counts, since, self._since = self._counts, Counter(), self._since, now
        if counts:
            causes = ", ".join(f"{cause}: {n}" for cause, n in sorted(counts.items()))
            log.warning(
                "Stripe: %d requests retried in the last %.0f s (%s)",
                sum(counts.values()),
                now - since,
                causes,
            )
