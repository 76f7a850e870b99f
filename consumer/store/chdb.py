"""ClickHouse in process (chDB): the embedded default."""

from __future__ import annotations

import json
import os
import queue
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa

from consumer.store.backend import (
    INPUT,
    MAX_INPUTS,
    NO_MERGE_ON_INSERT,
    Row,
    StoreError,
    StoreLocked,
    inputs_in,
)
from consumer.store.errors import classified, code_in

_CONNECTIONS = 3


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Hold what the engine writes to file descriptor 2 while a store opens: written back
    when it opens, dropped when it does not (the error raised says it, in one line)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        # only reached when the store opened: nothing of it is hidden then
        held.seek(0)
        os.write(2, held.read())


class ChdbBackend:
    """ClickHouse in process. One process per store path (chDB's file lock enforces it)."""

    def __init__(self, path: Path, database: str) -> None:
        import chdb
        from chdb import session

        path.mkdir(parents=True, exist_ok=True)
        self._database = database
        try:
            with _quiet_stderr():  # chDB writes its own line about a held lock to fd 2
                self._session = session.Session(str(path))
            self._session.query(f"CREATE DATABASE IF NOT EXISTS {database}", "CSV")
            self._session.query(f"USE {database}", "CSV")
            self._session.query(NO_MERGE_ON_INSERT, "CSV")
            # More connections to the same store: one range's independent writes run at
            # once (a connection runs one query at a time; separate ones run in parallel).
            conns: list[Any] = [self._session]
            for _ in range(_CONNECTIONS - 1):
                conn = chdb.connect(str(path))
                conn.query(f"USE {database}", "CSV")
                conn.query(NO_MERGE_ON_INSERT, "CSV")
                conns.append(conn)
        except Exception as exc:  # chDB raises a generic error when the store is locked
            holder = _holder(path)
            if holder is not None:
                raise StoreLocked(
                    f"the chDB store {path} is in use by another process (PID {holder}); "
                    "stop it first (several processes need a ClickHouse server)"
                ) from None
            raise StoreError(f"cannot open chDB store {path}: {exc}") from None
        self._conns = conns
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        for conn in conns:
            self._idle.put(conn)

    def _run(self, sql: str, fmt: str = "CSV", params: Mapping[str, Any] | None = None) -> Any:
        conn = self._idle.get()
        try:
            if params:
                text = {k: _param_text(v) for k, v in params.items()}
                return conn.query(sql, fmt, params=text)
            return conn.query(sql, fmt)
        except Exception as exc:  # chDB's text starts `Code: NN. DB::Exception: ...`
            raise classified(str(exc), code_in(str(exc)), sql) from exc
        finally:
            self._idle.put(conn)

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._run(sql, params=params)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        return self._rows(self._run(sql, "JSONCompact", params))

    def query_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> list[Row]:
        return self._rows(self._with(sql, inputs, "JSONCompact", params))

    def command_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> None:
        self._with(sql, inputs, "CSV", params)

    def _with(
        self,
        sql: str,
        inputs: Mapping[str, pa.Table],
        fmt: str,
        params: Mapping[str, Any] | None,
    ) -> Any:
        names = inputs_in(sql, inputs)
        # chDB's Python() reads a table by the name of a variable in the calling frame. Its
        # columns are declared non-null, as a server's external tables are: a LEFT JOIN then
        # fills defaults, not NULLs, on both backends.
        tables = [_not_null(inputs[n]) for n in names] + [None] * (MAX_INPUTS - len(names))
        _in0, _in1, _in2, _in3 = tables
        slot = {n: f"Python(_in{i})" for i, n in enumerate(names)}
        return self._run(INPUT.sub(lambda m: slot[m.group(1)], sql), fmt, params)

    @staticmethod
    def _rows(result: Any) -> list[Row]:
        raw = result.bytes()
        if not raw:
            return []
        body = json.loads(raw, parse_float=Decimal)
        return [tuple(r) for r in body["data"]]

    def insert_columns(self, table: str, columns: Mapping[str, pa.Array], token: str = "") -> None:
        if not columns or len(next(iter(columns.values()))) == 0:
            return
        arrow_table = pa.table(dict(columns))  # noqa: F841 - read by chDB's Python() by name
        names = ", ".join(columns)
        settings = [f"insert_deduplication_token='{token}'"] if token else []
        suffix = f" SETTINGS {', '.join(settings)}" if settings else ""
        self._run(f"INSERT INTO {table} ({names}) SELECT * FROM Python(arrow_table){suffix}")

    def close(self) -> None:
        for _ in self._conns:  # wait until every connection is idle
            self._idle.get()
        for conn in reversed(self._conns):
            conn.close()


def _not_null(table: pa.Table) -> pa.Table:
    fields = [f.with_type(_not_null_type(f.type)).with_nullable(False) for f in table.schema]
    columns = [
        c.cast(f.type) if f.type != c.type else c
        for c, f in zip(table.columns, fields, strict=True)
    ]
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def _not_null_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_map(t):
        return pa.map_(t.key_type, pa.field(t.item_field.name, t.item_type, nullable=False))
    return t


def _holder(path: Path) -> int | None:
    """The live process holding the store: ClickHouse writes its PID into <path>/status."""
    try:
        lines = (path / "status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("PID:"):
            pid = int(line.split(":", 1)[1].strip())
            if pid == os.getpid():
                return None
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                return pid
            return pid
    return None


def _quote(v: Any) -> str:
    """A ClickHouse literal. Tuples are written element by element: Python's repr of a tuple
    quotes a string holding ' with " and writes \\u escapes, which ClickHouse reads as
    another string or refuses (a customer id with an apostrophe stopped every emitter cycle)."""
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, tuple):
        return "(" + ",".join(_quote(x) for x in v) + ")"
    if isinstance(v, list):
        return "[" + ",".join(_quote(x) for x in v) + "]"
    return str(v)


def _param_text(v: Any) -> Any:
    """chDB takes parameters as text: arrays must be ClickHouse array literals."""
    if isinstance(v, list | tuple):
        return _quote(list(v))
    return v
