"""Heartbeats of the threads that do the work, read by /healthz (consumer/ops/health.py).

A process whose consume loop, rollup or emitter hangs (a deadlock, a call that never
returns) answers HTTP as happily as a healthy one; only a liveness probe that fails then
gets it restarted. A part is stuck when it is busy and has not beaten for the stall time.
One waiting for work (the rollup with no job) is idle, never stuck; one waiting out a
dependency's outage keeps beating as it retries, so an outage restarts nothing."""

from __future__ import annotations

import threading

from consumer.clock import Clock


class Heartbeat:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last = clock.monotonic()
        self._busy = True

    def beat(self, busy: bool = True) -> None:
        """Alive now; `busy=False`: about to wait for work, which cannot be stuck."""
        with self._lock:
            self._last, self._busy = self._clock.monotonic(), busy

    def stuck(self, stall_seconds: float) -> bool:
        with self._lock:
            return self._busy and self._clock.monotonic() - self._last >= stall_seconds
