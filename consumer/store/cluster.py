"""Cluster mode (`clickhouse.cluster`): the same migrations, run on every node of a ClickHouse
cluster, their tables replicated through Keeper.

The migrations are written for one server. Rather than a second copy of each, every
statement is rewritten on its way to the server, by its text: DDL gets `ON CLUSTER`, each
`*MergeTree` engine becomes its `Replicated*` twin with the Keeper path and replica name in
front of its own arguments, and the non-replicated insert-dedup window becomes the
replicated one. A migration added later is rewritten the same way, with nothing to declare.
Without a cluster nothing is rewritten: the single server gets the statements byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from consumer.config import DEFAULT_REPLICA_NAME, DEFAULT_REPLICA_PATH, ClickHouseConfig
from consumer.store.backend import Backend, Row, quote_identifier

# The MergeTree engines that have a Replicated twin taking the same arguments after
# (path, replica name). Any other *MergeTree engine is refused rather than left unreplicated.
_FAMILY = frozenset(
    {
        "",
        "Replacing",
        "Summing",
        "Aggregating",
        "Collapsing",
        "VersionedCollapsing",
        "Graphite",
        "Coalescing",
    }
)

_LEAD = r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*"
_NAME_PART = r"(?:`(?:[^`\\]|\\.|``)*`|\"(?:[^\"\\]|\\.)*\"|[A-Za-z_][A-Za-z0-9_$]*)"
_NAME = rf"{_NAME_PART}(?:\s*\.\s*{_NAME_PART})?"


def _after_name(statement: str) -> re.Pattern[str]:
    """A statement naming one object, up to its name. Atomic, so that a statement already
    ON CLUSTER is never read another way (`IF` taken for the name, a name cut short)."""
    return re.compile(f"{_LEAD}(?>{statement})(?!\\s+ON\\s+CLUSTER\\b)", re.I | re.DOTALL)


# Statements naming one object, ON CLUSTER right after its name (and UUID, if given).
_AFTER_NAME = [
    _after_name(
        r"CREATE\s+(?:OR\s+REPLACE\s+)?(?:TEMPORARY\s+)?"
        r"(?:TABLE|VIEW|MATERIALIZED\s+VIEW|LIVE\s+VIEW|DICTIONARY|DATABASE)\s+"
        rf"(?:IF\s+NOT\s+EXISTS\s+)?{_NAME}(?:\s+UUID\s+'[^']*')?"
    ),
    _after_name(rf"REPLACE\s+(?:TABLE|DICTIONARY)\s+{_NAME}"),
    _after_name(rf"ALTER\s+(?:TABLE|VIEW|DATABASE)\s+{_NAME}"),
    _after_name(
        r"DROP\s+(?:TEMPORARY\s+)?(?:TABLE|VIEW|DICTIONARY|DATABASE)\s+"
        rf"(?:IF\s+EXISTS\s+)?(?:IF\s+EMPTY\s+)?{_NAME}"
    ),
    _after_name(rf"TRUNCATE\s+(?:TEMPORARY\s+)?(?:TABLE\s+)?(?:IF\s+EXISTS\s+)?{_NAME}"),
    _after_name(rf"OPTIMIZE\s+TABLE\s+{_NAME}"),
]
# Statements naming several objects: ON CLUSTER at the end.
_AT_END = re.compile(_LEAD + r"(?:RENAME|EXCHANGE)\s+(?:TABLES?|DICTIONARIES|DICTIONARY)\b", re.I)
_HAS_CLUSTER = re.compile(r"\bON\s+CLUSTER\b", re.I)
_ENGINE = re.compile(r"\b(?i:ENGINE)(\s*=\s*)(?!Replicated)(\w*)MergeTree\b(\s*\()?")
_DEDUP = re.compile(r"\bnon_replicated_deduplication_window\b")


@dataclass(frozen=True)
class Cluster:
    """A ClickHouse cluster (a `remote_servers` name, or a macro such as `{cluster}`) and
    where each replicated table keeps its state in Keeper."""

    name: str
    replica_path: str = DEFAULT_REPLICA_PATH
    replica_name: str = DEFAULT_REPLICA_NAME

    def render(self, sql: str) -> str:
        """`sql` as this cluster runs it (statements that are not DDL come back as given)."""
        on = f" ON CLUSTER {quote_identifier(self.name)}"
        for pattern in _AFTER_NAME:
            if match := pattern.match(sql):
                return self._engines(sql[: match.end()] + on + sql[match.end() :])
        if _AT_END.match(sql) and not _HAS_CLUSTER.search(sql):
            body = sql.rstrip().rstrip(";").rstrip()
            return body + on + sql[len(body) :]
        return _DEDUP.sub("replicated_deduplication_window", sql)

    def sync_replica(self, table: str) -> str:
        """Wait until this node holds every part the other replicas have of `table`."""
        return f"SYSTEM SYNC REPLICA {table}"

    def _engines(self, sql: str) -> str:
        keeper = f"{_literal(self.replica_path)}, {_literal(self.replica_name)}"

        def replicated(m: re.Match[str]) -> str:
            kind = m.group(2)
            if kind not in _FAMILY:
                raise ValueError(f"no replicated {kind}MergeTree for cluster mode: {sql[:80]}")
            engine = f"ENGINE{m.group(1)}Replicated{kind}MergeTree({keeper}"
            if m.group(3) is None:
                return engine + ")"
            rest = sql[m.end() :]
            return engine + ("" if rest.lstrip().startswith(")") else ", ")

        return _DEDUP.sub("replicated_deduplication_window", _ENGINE.sub(replicated, sql))


_KEEPER_ARGS = re.compile(r"^Replicated(\w*MergeTree)\('(?:[^'\\]|\\.)*', '(?:[^'\\]|\\.)*'(?:, )?")


def unreplicated(engine_full: str) -> str:
    """A table's `engine_full` as one server shows it: a Replicated* engine without its
    Keeper path and replica name, so a check of a table's engine holds in both modes."""
    plain = _KEEPER_ARGS.sub(r"\1(", engine_full)
    return plain if plain == engine_full else re.sub(r"^(\w*MergeTree)\(\)", r"\1", plain)


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def cluster_of(cfg: ClickHouseConfig) -> Cluster | None:
    """The configured cluster, or None for a single server."""
    if cfg.cluster is None:
        return None
    return Cluster(cfg.cluster, cfg.replica_path, cfg.replica_name)


class ClusterStore:
    """A Backend whose statements run on every node of `cluster`: each command is rendered
    (`Cluster.render`) before it reaches `store`; queries and inserts pass as they are."""

    def __init__(self, store: Backend, cluster: Cluster) -> None:
        self.store = store
        self.cluster = cluster

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self.store.command(self.cluster.render(sql), params)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        return self.store.query(sql, params)

    def insert_columns(self, table: str, columns: Mapping[str, pa.Array], token: str = "") -> None:
        self.store.insert_columns(table, columns, token)

    def query_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> list[Row]:
        return self.store.query_with(sql, inputs, params)

    def command_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> None:
        self.store.command_with(self.cluster.render(sql), inputs, params)

    def close(self) -> None:
        self.store.close()


def on_cluster(store: Backend, cluster: Cluster | None) -> Backend:
    """`store`, its DDL run on every node of `cluster` (as it is without one)."""
    return store if cluster is None else ClusterStore(store, cluster)


def sync_replicas(store: Backend, cluster: Cluster) -> list[str]:
    """Fetch onto this node every part the other replicas hold of each table, before the
    consumer reads here: it must read its own writes, those it made through another node
    before a restart too. Waits while a replica holding parts this one lacks is down."""
    rows = store.query(
        """SELECT name FROM system.tables
           WHERE database = currentDatabase() AND engine LIKE '%MergeTree' ORDER BY name"""
    )
    names = [str(name) for (name,) in rows]
    for name in names:
        store.command(cluster.sync_replica(quote_identifier(name)))
    return names


def cluster_in(store: Backend) -> Cluster | None:
    """The cluster `store`'s DDL runs on (None: a single server)."""
    return store.cluster if isinstance(store, ClusterStore) else None
