"""One lock per store in a process: a batch's ledger question and its ledger write as one step.

The dedup key is (meter, event id) while a ledger row's identity also holds the event's
minute, so two copies of one event stamped differently (a producer that re-stamped a retry)
are two ledger rows unless the second copy's classification sees the first one written.
Instances that share a store hold this lock (a `Turn`) from the moment they ask the ledger
until their ledger write is durable, so whichever classifies second sees the other's copy
and calls its own a duplicate, whatever partitions the copies came in (consumer/ingest/loop.py).

Processes have no common lock: copies two of them accept at once are settled after they
are written (consumer/sinks/copies.py).

Keyed by where the store lives (the chDB path, or the server and database), not by the
handle, so two handles on one store share it too.
"""

from __future__ import annotations

import threading

from consumer.config import ClickHouseConfig

_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()


def store_key(cfg: ClickHouseConfig) -> str:
    if cfg.backend == "chdb":
        return f"chdb:{cfg.chdb_path.resolve()}/{cfg.database}"
    return f"server:{cfg.host}:{cfg.port}/{cfg.database}"


def ledger_lock(cfg: ClickHouseConfig) -> threading.Lock:
    """The process's lock for the store `cfg` names."""
    key = store_key(cfg)
    with _guard:
        return _locks.setdefault(key, threading.Lock())


class Turn:
    """One batch's turn on the ledger: the lock taken on entry and released once, by `done`
    as soon as the ledger write is durable, or on leaving the block (a failure, or nothing
    to write)."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._held = False

    def __enter__(self) -> Turn:
        self._lock.acquire()
        self._held = True
        return self

    def done(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()

    def __exit__(self, *_exc: object) -> None:
        self.done()
