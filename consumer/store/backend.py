"""One small ClickHouse interface, two backends running the same SQL.

`ChdbBackend` is ClickHouse in process (the embedded default); `ServerBackend` talks to a
ClickHouse server through clickhouse-connect. Both insert columns, never SQL text built
row by row, and return query rows as plain Python values. Queries cast Decimals to
String and times to epoch milliseconds so both backends return identical values.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

Row = tuple[Any, ...]
DECIMAL = pa.decimal128(38, 9)
TIME_MS = pa.timestamp("ms", tz="UTC")


class StoreError(Exception):
    """A ClickHouse failure (transient or not); the message never carries a password."""


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


_CONNECTIONS = 3
# A replacing table collapses equal keys when parts merge, and every reader of one either
# reads with FINAL or only asks whether a key exists: collapsing each inserted block as
# well (the default) only costs time, about a fifth of a window recompute's insert.
_NO_MERGE_ON_INSERT = "SET optimize_on_insert = 0"
_INPUT = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_MAX_INPUTS = 4


def _inputs_in(sql: str, inputs: Mapping[str, pa.Table]) -> list[str]:
    names = list(dict.fromkeys(_INPUT.findall(sql)))
    missing = [n for n in names if n not in inputs]
    if missing or len(names) > _MAX_INPUTS:
        raise ValueError(f"query inputs {names}: missing {missing}, at most {_MAX_INPUTS}")
    return names


class ChdbBackend:
    """ClickHouse in process. One process per store path (chDB's file lock enforces it)."""

    def __init__(self, path: Path, database: str, fsync: bool = False) -> None:
        import chdb
        from chdb import session

        path.mkdir(parents=True, exist_ok=True)
        self._database = database
        self._settings = "SETTINGS fsync_after_insert=1" if fsync else ""
        try:
            self._session = session.Session(str(path))
            self._session.query(f"CREATE DATABASE IF NOT EXISTS {database}", "CSV")
            self._session.query(f"USE {database}", "CSV")
            self._session.query(_NO_MERGE_ON_INSERT, "CSV")
            # More connections to the same store: one range's independent writes run at
            # once (a connection runs one query at a time; separate ones run in parallel).
            conns: list[Any] = [self._session]
            for _ in range(_CONNECTIONS - 1):
                conn = chdb.connect(str(path))
                conn.query(f"USE {database}", "CSV")
                conn.query(_NO_MERGE_ON_INSERT, "CSV")
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
        except Exception as exc:
            raise StoreError(str(exc)) from exc
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
        names = _inputs_in(sql, inputs)
        # chDB's Python() reads a table by the name of a variable in the calling frame. Its
        # columns are declared non-null, as a server's external tables are: a LEFT JOIN then
        # fills defaults, not NULLs, on both backends.
        tables = [_not_null(inputs[n]) for n in names] + [None] * (_MAX_INPUTS - len(names))
        _in0, _in1, _in2, _in3 = tables
        slot = {n: f"Python(_in{i})" for i, n in enumerate(names)}
        return self._run(_INPUT.sub(lambda m: slot[m.group(1)], sql), fmt, params)

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
        if self._settings:
            settings.append("fsync_after_insert=1")
        suffix = f" SETTINGS {', '.join(settings)}" if settings else ""
        self._run(f"INSERT INTO {table} ({names}) SELECT * FROM Python(arrow_table){suffix}")

    def close(self) -> None:
        for _ in self._conns:  # wait until every connection is idle
            self._idle.get()
        for conn in reversed(self._conns):
            conn.close()


class ServerBackend:
    """A ClickHouse server through clickhouse-connect (production)."""

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        database: str,
        secure: bool = False,
        fsync: bool = False,
    ) -> None:
        import clickhouse_connect

        try:
            admin = clickhouse_connect.get_client(
                host=host, port=port, username=username, password=password, secure=secure
            )
            admin.command(f"CREATE DATABASE IF NOT EXISTS {database}")
            admin.close()
            # No session: one client then runs a range's independent writes concurrently.
            self._client = clickhouse_connect.get_client(
                host=host,
                port=port,
                username=username,
                password=password,
                database=database,
                secure=secure,
                settings={"optimize_on_insert": 0, **({"fsync_after_insert": 1} if fsync else {})},
                autogenerate_session_id=False,
            )
        except Exception as exc:
            raise StoreError(_scrub(str(exc), password)) from None
        self._password = password

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        try:
            self._client.command(sql, parameters=dict(params or {}))
        except Exception as exc:
            raise StoreError(_scrub(str(exc), self._password)) from exc

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        try:
            rows: Sequence[Sequence[Any]] = self._client.query(
                sql, parameters=dict(params or {})
            ).result_rows
        except Exception as exc:
            raise StoreError(_scrub(str(exc), self._password)) from exc
        return [tuple(r) for r in rows]

    def insert_columns(self, table: str, columns: Mapping[str, pa.Array], token: str = "") -> None:
        if not columns or len(next(iter(columns.values()))) == 0:
            return
        settings = {"insert_deduplication_token": token} if token else None
        try:
            self._client.insert_arrow(table, pa.table(dict(columns)), settings=settings)
        except Exception as exc:
            raise StoreError(_scrub(str(exc), self._password)) from exc

    def query_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> list[Row]:
        text, data = self._external(sql, inputs)
        try:
            rows: Sequence[Sequence[Any]] = self._client.query(
                text, parameters=dict(params or {}), external_data=data
            ).result_rows
        except Exception as exc:
            raise StoreError(_scrub(str(exc), self._password)) from exc
        return [tuple(r) for r in rows]

    def command_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> None:
        text, data = self._external(sql, inputs)
        try:
            self._client.command(text, parameters=dict(params or {}), external_data=data)
        except Exception as exc:
            raise StoreError(_scrub(str(exc), self._password)) from exc

    @staticmethod
    def _external(sql: str, inputs: Mapping[str, pa.Table]) -> tuple[str, Any]:
        """The inputs as ClickHouse external tables (Parquet), referred to by name."""
        from clickhouse_connect.driver.external import ExternalData

        data = ExternalData()
        for name in _inputs_in(sql, inputs):
            table = inputs[name]
            buf = io.BytesIO()
            pq.write_table(table, buf)
            structure = [f"{f.name} {clickhouse_type(f.type)}" for f in table.schema]
            data.add_file(file_name=name, data=buf.getvalue(), fmt="Parquet", structure=structure)
        return _INPUT.sub(lambda m: m.group(1), sql), data

    def close(self) -> None:
        self._client.close()


def clickhouse_type(t: pa.DataType) -> str:
    """The ClickHouse type an Arrow column of the store's inputs is read as."""
    if pa.types.is_string(t):
        return "String"
    if pa.types.is_decimal(t):
        return f"Decimal({t.precision}, {t.scale})"
    if pa.types.is_timestamp(t):
        return f"DateTime64(3, '{t.tz or 'UTC'}')"
    if pa.types.is_map(t):
        return f"Map({clickhouse_type(t.key_type)}, {clickhouse_type(t.item_type)})"
    if pa.types.is_integer(t):
        sign = "Int" if pa.types.is_signed_integer(t) else "UInt"
        return f"{sign}{t.bit_width}"
    raise ValueError(f"no ClickHouse type for Arrow {t}")


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
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(v)


def _param_text(v: Any) -> Any:
    """chDB takes parameters as text: arrays must be ClickHouse array literals."""
    if isinstance(v, list | tuple):
        return "[" + ",".join(_quote(x) for x in v) + "]"
    return v


def _scrub(message: str, secret: str) -> str:
    return message.replace(secret, "***") if secret else message
