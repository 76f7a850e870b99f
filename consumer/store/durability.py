"""Host-crash durability (P8): every insert's part fsynced before the insert returns.

`fsync_after_insert` and `fsync_part_directory` are MergeTree *table* settings: ClickHouse
answers an insert or query that carries them with UNKNOWN_SETTING. So they are set on every
MergeTree table of the database once migrations have run (tables a later migration adds get
them at the next start), and taken back when the option is switched off.
"""

from __future__ import annotations

from consumer.store.backend import Backend, quote_identifier
from consumer.store.cluster import Cluster, on_cluster

SETTINGS = ("fsync_after_insert", "fsync_part_directory")
_ON = ", ".join(f"{s} = 1" for s in SETTINGS)


def apply_fsync(store: Backend, on: bool, cluster: Cluster | None = None) -> list[str]:
    """Make every MergeTree table's fsync settings match `on` (on every node of `cluster`);
    returns the tables changed."""
    store = on_cluster(store, cluster)
    rows = store.query(
        """SELECT name, create_table_query FROM system.tables
           WHERE database = currentDatabase() AND engine LIKE '%MergeTree' ORDER BY name"""
    )
    changed = []
    for name, ddl in rows:
        has = "fsync_after_insert = 1" in str(ddl)
        quoted = quote_identifier(str(name))
        if on and not has:
            store.command(f"ALTER TABLE {quoted} MODIFY SETTING {_ON}")
        elif has and not on:
            store.command(f"ALTER TABLE {quoted} RESET SETTING {', '.join(SETTINGS)}")
        else:
            continue
        changed.append(str(name))
    return changed
