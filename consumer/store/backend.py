"""One small ClickHouse interface, two backends running the same SQL.

`ChdbBackend` is ClickHouse in process (the embedded default); `ServerBackend` talks to a
ClickHouse server through clickhouse-connect. Both insert columns, never SQL text built
row by row, and return query rows as plain Python values. Queries cast Decimals to
String and times to epoch milliseconds so both backends return identical values.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

Row = tuple[Any, ...]
DECIMAL = pa.decimal128(38, 9)
TIME_MS = pa.timestamp("ms", tz="UTC")


class StoreError(Exception):
    """A ClickHouse failure (transient or not); the message never carries a password."""


class StoreLocked(StoreError):
    """The embedded store is held by another process."""


class Backend(Protocol):
    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None: ...

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]: ...

    def insert_columns(self, table: str, columns: Mapping[str, pa.Array], token: str = "") -> None:
        """Insert equal-length Arrow columns; `token` is a dedup fast path (P3), not a guard."""
        ...

    def close(self) -> None: ...


class ChdbBackend:
    """ClickHouse in process. One process per store path (chDB's file lock enforces it)."""

    def __init__(self, path: Path, database: str, fsync: bool = False) -> None:
        from chdb import session

        path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._database = database
        self._settings = "SETTINGS fsync_after_insert=1" if fsync else ""
        try:
            self._session = session.Session(str(path))
            self._session.query(f"CREATE DATABASE IF NOT EXISTS {database}", "CSV")
            self._session.query(f"USE {database}", "CSV")
        except Exception as exc:  # chDB raises a generic error when the store is locked
            holder = _holder(path)
            if holder is not None:
                raise StoreLocked(
                    f"the chDB store {path} is in use by another process (PID {holder}); "
                    "stop it first (several processes need a ClickHouse server)"
                ) from None
            raise StoreError(f"cannot open chDB store {path}: {exc}") from None

    def _run(self, sql: str, fmt: str = "CSV", params: Mapping[str, Any] | None = None) -> Any:
        try:
            with self._lock:
                if params:
                    text = {k: _param_text(v) for k, v in params.items()}
                    return self._session.query(sql, fmt, params=text)
                return self._session.query(sql, fmt)
        except Exception as exc:
            raise StoreError(str(exc)) from exc

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self._run(sql, params=params)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        result = self._run(sql, "JSONCompact", params)
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
        sql = f"INSERT INTO {table} ({names}) SELECT * FROM Python(arrow_table){suffix}"
        try:
            with self._lock:
                self._session.query(sql, "CSV")
        except Exception as exc:
            raise StoreError(str(exc)) from exc

    def close(self) -> None:
        with self._lock:
            self._session.close()


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
            self._client = clickhouse_connect.get_client(
                host=host,
                port=port,
                username=username,
                password=password,
                database=database,
                secure=secure,
                settings={"fsync_after_insert": 1} if fsync else None,
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

    def close(self) -> None:
        self._client.close()


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
