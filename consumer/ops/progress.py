"""A dependency-free progress bar on stderr (redrawn in place on a terminal)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, width: int = 30) -> None:
        self._label, self._total, self._width = label, max(total, 1), width
        self._start = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._last_line = -1.0

    def update(self, n: int) -> None:
        now = time.monotonic()
        if not self._tty and now - self._last_line < 5:
            return
        self._last_line = now
        self._draw(n, end="\r" if self._tty else "\n")

    def done(self, n: int) -> None:
        self._draw(n, end="\n")

    def _draw(self, n: int, end: str) -> None:
        frac = min(n / self._total, 1.0)
        filled = int(frac * self._width)
        rate = n / max(time.monotonic() - self._start, 1e-9)
        sys.stderr.write(
            f"{self._label:>8} [{'#' * filled}{'.' * (self._width - filled)}] "
            f"{n:>9,}/{self._total:,} {rate:>10,.0f}/s{end}"
        )
        sys.stderr.flush()
