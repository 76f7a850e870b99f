"""Dedup stage: a per-partition filter of recently seen (meter, event id) pairs.

The filter only says "maybe seen"; the keyed ledger confirms positives and collapses any
duplicate at any distance, so it is a fast path and a metric source, never the guard.
Ids are never claimed before the range that carries them is written.
"""

from __future__ import annotations

from collections.abc import Iterable

HOUR_MS = 3_600_000


def id_hash(meter: str, event_id: str) -> int:
    return hash((meter, event_id))


class RecentIds:
    """Hashes of ids bucketed by event hour, pruned behind the partition's newest hour."""

    def __init__(self, window_ms: int) -> None:
        self._window_ms = window_ms
        self._buckets: dict[int, set[int]] = {}
        self._newest = 0

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def might_contain(self, h: int) -> bool:
        return any(h in bucket for bucket in self._buckets.values())

    def add(self, h: int, event_time_ms: int) -> None:
        hour = event_time_ms // HOUR_MS
        self._buckets.setdefault(hour, set()).add(h)
        if hour > self._newest:
            self._newest = hour
            self._prune()

    def add_many(self, items: Iterable[tuple[int, int]]) -> None:
        for h, ts in items:
            self.add(h, ts)

    def _prune(self) -> None:
        oldest = self._newest - self._window_ms // HOUR_MS - 1
        for hour in [h for h in self._buckets if h < oldest]:
            del self._buckets[hour]
