"""Dedup stage: a per-partition filter of recently seen (meter, event id) pairs.

The filter only says "maybe seen"; the keyed ledger confirms positives and collapses any
duplicate at any distance, so it is a fast path and a metric source, never the guard.
Ids are never claimed before the range that carries them is written.

Memory is bounded by design: each event hour keeps its ids' 64-bit hashes in one sorted
int64 array (8 bytes an id), and hashes added since the last lookup wait in a short list
until the next one sorts them in. Ten million ids in the window cost about 80 MB; Python
sets of the same hashes took about 70 bytes an id.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from consumer.decode.keys import Keys

HOUR_MS = 3_600_000
Hashes = npt.NDArray[np.int64]
_EMPTY: Hashes = np.empty(0, np.int64)


class RecentIds:
    """Hashes of ids bucketed by event hour, pruned behind the partition's newest hour."""

    def __init__(self, window_ms: int) -> None:
        self._window_ms = window_ms
        self._sorted: dict[int, Hashes] = {}  # hour -> sorted, distinct hashes
        self._added: dict[int, list[int]] = {}  # hour -> hashes not sorted in yet
        self._chunks: dict[int, list[Hashes]] = {}  # hour -> arrays not sorted in yet
        self._newest = 0

    def __len__(self) -> int:
        self._sort_in()
        return sum(len(a) for a in self._sorted.values())

    @property
    def nbytes(self) -> int:
        """Bytes the sorted hashes hold (what the window costs)."""
        return sum(a.nbytes for a in self._sorted.values())

    def might_contain(self, h: int) -> bool:
        return self.seen([h])[0]

    def seen(self, hashes: Sequence[int]) -> list[bool]:
        """For each hash, whether it may have been added: one vectorised lookup per hour."""
        wanted = np.fromiter(hashes, np.int64, len(hashes))
        return [bool(f) for f in self.seen_keys(wanted)]

    def add(self, h: int, event_time_ms: int) -> None:
        hour = event_time_ms // HOUR_MS
        added = self._added.get(hour)
        if added is None:
            added = self._added[hour] = []
        added.append(h)
        if hour > self._newest:
            self._newest = hour
            self._prune()

    def add_keys(self, keys: Keys, times_ms: npt.NDArray[np.int64]) -> None:
        """Many keys at once (a range's accepted events), grouped by event hour."""
        if not len(keys):
            return
        hours = times_ms // HOUR_MS
        order = np.argsort(hours, kind="stable")
        hours, keys = hours[order], keys[order]
        cuts = np.flatnonzero(np.diff(hours)) + 1
        for hour, part in zip(hours[np.r_[0, cuts]].tolist(), np.split(keys, cuts), strict=True):
            self._chunks.setdefault(hour, []).append(part)
        newest = int(hours[-1])
        if newest > self._newest:
            self._newest = newest
            self._prune()

    def seen_keys(self, keys: Keys) -> npt.NDArray[np.bool_]:
        """For each key, whether it may have been added: one vectorised lookup per hour."""
        self._sort_in()
        found = np.zeros(len(keys), bool)
        if not len(keys):
            return found
        for arr in self._sorted.values():
            at = np.minimum(np.searchsorted(arr, keys), len(arr) - 1)
            found |= arr[at] == keys
        return found

    def _sort_in(self) -> None:
        for hour in {*self._added, *self._chunks}:
            added = self._added.get(hour, [])
            parts = [np.fromiter(added, np.int64, len(added)), *self._chunks.get(hour, [])]
            self._sorted[hour] = _merged(self._sorted.get(hour, _EMPTY), np.concatenate(parts))
        self._added, self._chunks = {}, {}

    def _prune(self) -> None:
        oldest = self._newest - self._window_ms // HOUR_MS - 1
        for buckets in (self._sorted, self._added, self._chunks):
            _drop_before(buckets, oldest)


def _drop_before(buckets: MutableMapping[int, Any], oldest: int) -> None:
    for hour in [h for h in buckets if h < oldest]:
        del buckets[hour]


def _merged(arr: Hashes, added: Hashes) -> Hashes:
    """`arr` with `added` sorted in: a search and one copy, not a sort of the whole hour."""
    fresh = np.unique(added)
    if not len(arr):
        return fresh
    at = np.searchsorted(arr, fresh)
    new = arr[np.minimum(at, len(arr) - 1)] != fresh
    return np.insert(arr, at[new], fresh[new])
