"""Migration 16: the growing tables partitioned by month, so retention drops whole months.

With no `PARTITION BY`, a TTL can only delete rows in merges that rewrite whole parts, and
merges span the whole table. Each table is partitioned by the time its identity carries
(the ledger and windows by event minute, the side outputs by their Kafka record time), so
every version of one row lands in one partition and the replacing merge still meets them.
`cancellations` is left whole: a repeated cancel may carry another time, and it is small.
"""

from __future__ import annotations

from collections.abc import Callable

from consumer.store.backend import Backend
from consumer.store.cluster import unreplicated
from consumer.store.migrations._sql import Step, copy_and_swap, table_property

PARTITIONS = {
    "usage_events": "toYYYYMM(event_time)",
    "usage_windows": "toYYYYMM(window_start)",
    "dead_letters": "toYYYYMM(record_time)",
    "late_events": "toYYYYMM(record_time)",
}


def _partition(table: str, key: str) -> Callable[[Backend], None]:
    def step(store: Backend) -> None:
        """Copy `table` into a table like it but partitioned by `key`, and swap them
        (copy_and_swap: safe to run again after a crash at any point)."""

        def finished(s: Backend) -> bool:
            return table_property(s, table, "partition_key") == key

        # In cluster mode the engine is shown with the table's own Keeper path: the copy
        # needs its own, which the cluster rendering of the CREATE gives it.
        engine = unreplicated(table_property(store, table, "engine_full") or "")
        create = ""
        if not finished(store):
            if " ORDER BY " not in engine:
                raise RuntimeError(f"migration 16: unexpected engine of {table}: {engine}")
            head, tail = engine.split(" ORDER BY ", 1)
            create = (
                f"CREATE TABLE IF NOT EXISTS {table}_partitioned AS {table} "
                f"ENGINE = {head} PARTITION BY {key} ORDER BY {tail}"
            )
        columns = ", ".join(
            str(r[0])
            for r in store.query(
                """SELECT name FROM system.columns
                   WHERE database = currentDatabase() AND table = {t:String}
                     AND default_kind NOT IN ('MATERIALIZED', 'ALIAS')
                   ORDER BY position""",
                {"t": table},
            )
        )
        copy_and_swap(
            store,
            table,
            f"{table}_partitioned",
            create,
            columns,
            table,
            finished,
            f"its monthly partitions by {key}",
        )

    return step


NUMBER = 16
NAME = "growing tables partitioned by month"
STEPS: list[Step] = [_partition(t, k) for t, k in PARTITIONS.items()]
