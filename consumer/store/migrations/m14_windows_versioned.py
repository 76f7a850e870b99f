"""Migration 14: window rows versioned by when their recompute read the ledger."""

from __future__ import annotations

from consumer.store.backend import Backend
from consumer.store.cluster import unreplicated
from consumer.store.migrations._sql import DEDUP, Step, copy_and_swap, table_property

# Two recomputes of one window (two instances, or two processes on one server) could land in
# either order, and without a version the last insert won: a recompute that had read the
# ledger before another instance's row landed could replace the one that counted it (a
# two-instance chaos run lost one unit that way). `computed_at` is now the version, set by
# the server when the recompute starts reading (consumer/sinks/rollup.py), so the newest
# read wins whatever the order of the inserts.
_ENGINE = "ReplacingMergeTree(computed_at)"
_VERSIONED = f"""CREATE TABLE IF NOT EXISTS usage_windows_versioned (
    meter LowCardinality(String),
    customer_id String,
    window_start DateTime('UTC'),
    sum_value Decimal(38, 9),
    event_count UInt64,
    min_value Decimal(38, 9),
    max_value Decimal(38, 9),
    first_value Decimal(38, 9),
    first_time DateTime64(3, 'UTC'),
    last_value Decimal(38, 9),
    last_time DateTime64(3, 'UTC'),
    computed_at DateTime64(9, 'UTC')
) ENGINE = {_ENGINE}
ORDER BY (meter, customer_id, window_start)
SETTINGS {DEDUP}"""


_COLUMNS = (
    "meter, customer_id, window_start, sum_value, event_count, min_value, max_value, "
    "first_value, first_time, last_value, last_time, computed_at"
)


def _versioned(store: Backend) -> bool:
    """Whether usage_windows is the versioned table (replicated or not)."""
    engine = table_property(store, "usage_windows", "engine_full") or ""
    return unreplicated(engine).startswith(_ENGINE)


def _version_windows(store: Backend) -> None:
    """Copy the windows as they read (FINAL) into the versioned table and swap the two
    atomically."""
    copy_and_swap(
        store,
        "usage_windows",
        "usage_windows_versioned",
        _VERSIONED,
        _COLUMNS,
        "usage_windows FINAL",
        _versioned,
        "the versioned table",
    )


NUMBER = 14
NAME = "window rows versioned by their recompute's read"
STEPS: list[Step] = [_version_windows]
