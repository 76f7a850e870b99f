"""One small ClickHouse interface, two backends running the same SQL.

`ChdbBackend` is ClickHouse in process (the embedded default); `ServerBackend` talks to a
ClickHouse server through clickhouse-connect. Both insert columns, never SQL text built
row by row, and return query rows as plain Python values. Queries cast Decimals to
String and times to epoch milliseconds so both backends return identical values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Protocol

import pyarrow as pa

Row = tuple[Any, ...]


class StoreError(Exception):
    """A ClickHouse failure; the message never carries a password. The backends raise one of
    the two kinds below (errors.py tells them apart by ClickHouse's exception code)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code  # ClickHouse's exception code, None when the failure had none


class StoreUnavailable(StoreError):
    """The store cannot do it now (unreachable, timed out, overloaded, a replica or Keeper
    away): pause and retry, nothing is lost."""


class StoreBug(StoreError):
    """The store refused the statement itself (syntax, a missing table or column, a type):
    a retry repeats it forever, so it stops the process, loudly."""


class StoreLocked(StoreError):
    """The embedded store is held by another process."""


class Backend(Protocol):
    """Safe to call from several threads: their calls run concurrently (a range's
    independent writes do)."""

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None: ...

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]: ...

    def insert_columns(self, table: str, columns: Mapping[str, pa.Array], token: str = "") -> None:
        """Insert equal-length Arrow columns; `token` is a dedup fast path (P3), not a guard."""
        ...

    def query_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> list[Row]:
        """A query reading Arrow tables as `$name` (at most four): a batch's keys go to
        ClickHouse as columns, never as SQL text or parameter lists."""
        ...

    def command_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> None:
        """A statement (INSERT ... SELECT) reading Arrow tables as `$name`, as `query_with`."""
        ...

    def close(self) -> None: ...


# A replacing table collapses equal keys when parts merge, and every reader of one either
# reads with FINAL or only asks whether a key exists: collapsing each inserted block as
# well (the default) only costs time, about a fifth of a window recompute's insert.
NO_MERGE_ON_INSERT = "SET optimize_on_insert = 0"
INPUT = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
MAX_INPUTS = 4


def inputs_in(sql: str, inputs: Mapping[str, pa.Table]) -> list[str]:
    """The `$name` inputs a statement reads, each one given, at most MAX_INPUTS."""
    names = list(dict.fromkeys(INPUT.findall(sql)))
    missing = [n for n in names if n not in inputs]
    if missing or len(names) > MAX_INPUTS:
        raise ValueError(f"query inputs {names}: missing {missing}, at most {MAX_INPUTS}")
    return names


def quote_identifier(name: str) -> str:
    """A ClickHouse identifier in backquotes, whatever characters it holds."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"
