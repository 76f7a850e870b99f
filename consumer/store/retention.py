"""Retention: each growing table's TTL made to match the configuration at start.

A TTL is a table property, so it is applied like the fsync settings (durability.py): read
what each table has, change only what differs (a changed TTL makes ClickHouse re-check every
part once, so it is never re-applied on an unchanged start). The tables are partitioned by
month (migration 16), so whole expired months are dropped rather than rewritten.
What each table must outlive is in docs/operations.md.
"""

from __future__ import annotations

import logging
import re

from consumer.config import RetentionConfig
from consumer.store.backend import Backend, quote_identifier
from consumer.store.cluster import Cluster, on_cluster

log = logging.getLogger(__name__)

# table -> (the time its rows expire by, the config field of its days, days added)
_TABLES = {
    "usage_events": ("event_time", "ledger_days", 0),
    # a cancel is kept as long as any original it may take back (35 days older)
    "cancellations": ("event_time", "ledger_days", 35),
    "usage_windows": ("window_start", "windows_days", 0),
    "dead_letters": ("record_time", "dead_letters_days", 0),
    "late_events": ("record_time", "late_events_days", 0),
    "ingest_state": ("written_at", "ingest_history_days", 0),
    # a superseded copy is named as long as its ledger row is kept
    "ledger_superseded": ("minute", "ledger_days", 0),
}


def wanted(config: RetentionConfig) -> dict[str, str | None]:
    """Each table's TTL expression as ClickHouse prints it, or None for none."""
    out: dict[str, str | None] = {}
    for table, (column, field, extra) in _TABLES.items():
        days = int(getattr(config, field))
        out[table] = f"toDateTime({column}) + toIntervalDay({days + extra})" if days else None
    return out


def apply_retention(
    store: Backend, config: RetentionConfig, cluster: Cluster | None = None
) -> list[str]:
    """Make every table's TTL match `config` (on every node of `cluster`); returns the
    tables changed."""
    store = on_cluster(store, cluster)
    rows = store.query(
        """SELECT name, engine_full FROM system.tables
           WHERE database = currentDatabase() AND name IN {t:Array(String)}""",
        {"t": list(_TABLES)},
    )
    current = {str(name): _ttl(str(engine)) for name, engine in rows}
    changed = []
    for table, ttl in wanted(config).items():
        if table not in current or current[table] == ttl:
            continue
        quoted = quote_identifier(table)
        if ttl is None:
            store.command(f"ALTER TABLE {quoted} REMOVE TTL")
        else:
            store.command(f"ALTER TABLE {quoted} MODIFY TTL {ttl}")
        log.info("retention of %s: %s", table, ttl or "for ever")
        changed.append(table)
    return changed


def _ttl(engine_full: str) -> str | None:
    match = re.search(r" TTL (.+?)(?: SETTINGS |$)", engine_full)
    return match.group(1) if match else None
