"""Migration 14: window rows versioned by when their recompute read the ledger."""

from __future__ import annotations

import logging

from consumer.store.backend import Backend
from consumer.store.migrations._sql import DEDUP, Step

log = logging.getLogger(__name__)

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


def _version_windows(store: Backend) -> None:
    """Copy the windows as they read (FINAL) into the versioned table and swap the two
    atomically. Safe to run again after a crash at any point: a finished swap is recognised
    by its engine, an unfinished copy is dropped and made again."""
    rows = store.query(
        """SELECT engine_full FROM system.tables
           WHERE database = currentDatabase() AND name = 'usage_windows'"""
    )
    if not rows or not str(rows[0][0]).startswith(_ENGINE):
        (count,) = store.query("SELECT count() FROM usage_windows FINAL")[0]
        if int(count):
            log.warning("copying %s windows into the versioned table", count)
        store.command("DROP TABLE IF EXISTS usage_windows_versioned")
        store.command(_VERSIONED)
        store.command("INSERT INTO usage_windows_versioned SELECT * FROM usage_windows FINAL")
        store.command("EXCHANGE TABLES usage_windows AND usage_windows_versioned")
    store.command("DROP TABLE IF EXISTS usage_windows_versioned")


NUMBER = 14
NAME = "window rows versioned by their recompute's read"
STEPS: list[Step] = [_version_windows]
