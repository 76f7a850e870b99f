"""A request-rate limiter shared by the sender threads.

GCRA (a token bucket expressed as a theoretical arrival time): each acquire reserves the
next slot and sleeps until it is due. No fractional token counts, so no float rounding can
leave a caller spinning on a wait shorter than the clock can express.
"""

from __future__ import annotations

import threading

from consumer.clock import Clock


class TokenBucket:
    def __init__(self, rate: float, clock: Clock, burst: float | None = None) -> None:
        self._interval = 1.0 / rate
        burst = burst if burst is not None else max(1.0, rate / 10)
        self._tolerance = (burst - 1.0) * self._interval  # how far ahead a burst may run
        self._clock = clock
        self._tat = clock.monotonic()  # when the next request is due at the steady rate
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one slot, sleeping until it is due; returns the seconds waited."""
        with self._lock:
            now = self._clock.monotonic()
            tat = max(self._tat, now)
            wait = tat - self._tolerance - now
            self._tat = tat + self._interval
        if wait > 0:
            self._clock.sleep(wait)
            return wait
        return 0.0
