"""Injected time: every decision that depends on time takes a Clock, so tests never sleep."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock epoch seconds."""
        ...

    def monotonic(self) -> float:
        """Seconds for measuring intervals; never goes backwards."""
        ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The host's clock; `skew_seconds` shifts wall time (a host whose clock jumped)."""

    def __init__(self, skew_seconds: float = 0.0) -> None:
        self._skew = skew_seconds

    def now(self) -> float:
        return time.time() + self._skew

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class ManualClock:
    """A clock tests move by hand; `sleep` advances it instead of blocking."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._mono = 0.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._mono += max(seconds, 0.0)

    def jump(self, seconds: float) -> None:
        """Move wall time only (a clock jump), leaving the monotonic clock alone."""
        self._now += seconds
