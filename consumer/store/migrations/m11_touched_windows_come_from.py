"""Migration 11: touched windows come from the batch itself."""

from __future__ import annotations

from consumer.store.migrations._sql import Step

NUMBER = 11
NAME = "touched windows come from the batch itself"
STEPS: list[Step] = [
    # A batch's windows are derived from its own accepted events when they are
    # recomputed (a retry re-forms the same events), so they are no longer stored.
    "DROP TABLE IF EXISTS dirty_windows",
]
