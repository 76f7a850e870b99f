"""What several migrations share: the step type, the insert-dedup window, the views."""

from __future__ import annotations

import logging
from collections.abc import Callable

from consumer.store.backend import Backend
from consumer.store.cluster import cluster_in

log = logging.getLogger(__name__)

# A statement, or a step that must look before it acts (a copy that may have been cut short).
Step = str | Callable[[Backend], None]

DEDUP = "non_replicated_deduplication_window = 1000"


def copy_and_swap(
    store: Backend,
    table: str,
    copy: str,
    create: str,
    columns: str,
    source: str,
    finished: Callable[[Backend], bool],
    what: str,
) -> None:
    """Copy `columns` of `source` into `copy` (made by `create`) and swap it with `table`
    atomically, unless `finished` says the swap was made. Safe to run again after a crash at
    any point: a finished swap is recognised, an unfinished copy is dropped and made again.
    On a cluster the copy is made on one node, after it has fetched every part the other
    replicas hold of `source` (the other nodes then fetch the copy's parts from it)."""
    if not finished(store):
        if (cluster := cluster_in(store)) is not None:
            store.command(cluster.sync_replica(source.split()[0]))
        (count,) = store.query(f"SELECT count() FROM {source}")[0]
        if int(count):
            log.warning("copying %s (%s rows) into %s", table, count, what)
        store.command(f"DROP TABLE IF EXISTS {copy}")
        store.command(create)
        store.command(f"INSERT INTO {copy} ({columns}) SELECT {columns} FROM {source}")
        store.command(f"EXCHANGE TABLES {table} AND {copy}")
    store.command(f"DROP TABLE IF EXISTS {copy}")


def table_property(store: Backend, table: str, column: str) -> str | None:
    """A column of `table`'s row in system.tables (its sorting key, engine, ...)."""
    rows = store.query(
        f"""SELECT {column} FROM system.tables
            WHERE database = currentDatabase() AND name = {{t:String}}""",
        {"t": table},
    )
    return str(rows[0][0]) if rows else None


def rollup_view(
    name: str,
    grain: str,
    column: str,
    create: str = "CREATE VIEW IF NOT EXISTS",
    source: str = "usage_windows FINAL",
) -> str:
    """Hour, day and month views derive from the minute windows the same way."""
    return f"""{create} {name} AS
        SELECT meter, customer_id, {grain} AS {column},
               sum(sum_value) AS sum_value, sum(event_count) AS event_count,
               min(min_value) AS min_value, max(max_value) AS max_value,
               argMin(first_value, first_time) AS first_value,
               argMax(last_value, last_time) AS last_value
        FROM {source} GROUP BY meter, customer_id, {column}"""


def totals_view(create: str, source: str) -> str:
    return f"""{create} usage_totals AS
        SELECT meter, customer_id,
               sum(sum_value) AS sum_value, sum(event_count) AS event_count,
               min(min_value) AS min_value, max(max_value) AS max_value,
               argMin(first_value, first_time) AS first_value,
               argMax(last_value, last_time) AS last_value,
               min(window_start) AS first_window, max(window_start) AS last_window
        FROM {source} GROUP BY meter, customer_id"""


USAGE_VIEWS = [
    ("usage_hourly", "toStartOfHour(window_start)", "hour"),
    ("usage_daily", "toDate(window_start)", "day"),
    ("usage_monthly", "toStartOfMonth(window_start)", "month"),
]
