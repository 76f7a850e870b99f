"""ClickHouse: reachable, and its schema exactly this build's (no migration pending, none
from a newer build)."""

from __future__ import annotations

from consumer.ops.doctor.report import Finding, fail, ok, warn
from consumer.ops.doctor.runner import Env
from consumer.store import Backend, StoreLocked
from consumer.store.migrations import MIGRATIONS


def clickhouse(env: Env) -> list[Finding]:
    cfg, name = env.settings.clickhouse, "clickhouse"
    where = f"chDB at {cfg.chdb_path}" if cfg.backend == "chdb" else f"{cfg.host}:{cfg.port}"
    try:
        store = env.store()
    except StoreLocked as exc:
        return [
            warn(
                name,
                f"{exc} (a running consumer applied the migrations when it started)",
                "run doctor while the consumer is stopped, or use a ClickHouse server",
            )
        ]
    done = applied(store)
    known = {v for v, _, _ in MIGRATIONS}
    latest = max(known)
    newer = sorted(done - known)
    if newer:
        return [
            fail(
                name,
                f"{where}: migrations {_list(newer)} are newer than this build (knows up to "
                f"{latest}): a newer version migrated this store",
                "run that version of usage-consumer (or a newer one), not this one",
            )
        ]
    pending = sorted(known - done)
    if pending:
        return [
            warn(
                name,
                f"{where}: migrations {_list(pending)} pending of {latest}",
                "run `usage-consumer migrate` (`run` applies them at start too)",
            )
        ]
    return [ok(name, f"{where}: reachable, schema at migration {latest} (current)")]


def applied(store: Backend) -> set[int]:
    """The migrations the store records (none before the first `migrate`)."""
    if not store.query("EXISTS TABLE schema_migrations")[0][0]:
        return set()
    return {int(r[0]) for r in store.query("SELECT version FROM schema_migrations FINAL")}


def state_partitions(store: Backend, group: str, topic: str, topic_id: str) -> int:
    """How many partitions of this incarnation of `topic` (rows from before topic ids were
    recorded count as it) the store holds ingest state for: the highest one plus one."""
    if not store.query("EXISTS TABLE ingest_latest")[0][0]:
        return 0
    rows = store.query(
        """SELECT max(partition) + 1, count() FROM ingest_latest
           WHERE group_id = {g:String} AND topic = {t:String} AND topic_id IN ({id:String}, '')""",
        {"g": group, "t": topic, "id": topic_id},
    )
    return int(rows[0][0]) if rows and int(rows[0][1]) else 0


def _list(versions: list[int]) -> str:
    if len(versions) > 2 and versions == list(range(versions[0], versions[-1] + 1)):
        return f"{versions[0]}-{versions[-1]}"
    return ", ".join(map(str, versions))
