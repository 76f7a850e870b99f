"""A ClickHouse server through clickhouse-connect."""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from consumer.store.backend import INPUT, Row, StoreError, inputs_in
from consumer.store.errors import classified, code_in

# A proxy or load balancer in front of ClickHouse answering for a server that is away:
# no ClickHouse code, and worth a retry.
_GATEWAY = re.compile(r"HTTP status (502|503|504)\b")


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
                settings={"optimize_on_insert": 0},
                autogenerate_session_id=False,
            )
        except Exception as exc:
            raise _failure(exc, f"CREATE DATABASE IF NOT EXISTS {database}", password) from None
        self._password = password

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        # raw_query, not command: command() puts bind parameters in the URL whatever their
        # size (HTTP 414 past a proxy's or server's line limit); raw_query moves large ones
        # into the form body.
        try:
            self._client.raw_query(sql, parameters=dict(params or {}))
        except Exception as exc:
            raise _failure(exc, sql, self._password) from exc

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        try:
            rows: Sequence[Sequence[Any]] = self._client.query(
                sql, parameters=dict(params or {})
            ).result_rows
        except Exception as exc:
            raise _failure(exc, sql, self._password) from exc
        return [tuple(r) for r in rows]

    def insert_columns(self, table: str, columns: Mapping[str, pa.Array], token: str = "") -> None:
        if not columns or len(next(iter(columns.values()))) == 0:
            return
        settings = {"insert_deduplication_token": token} if token else None
        try:
            self._client.insert_arrow(table, pa.table(dict(columns)), settings=settings)
        except Exception as exc:
            statement = f"INSERT INTO {table} ({', '.join(columns)})"
            raise _failure(exc, statement, self._password) from exc

    def query_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> list[Row]:
        text, data = self._external(sql, inputs)
        try:
            rows: Sequence[Sequence[Any]] = self._client.query(
                text, parameters=dict(params or {}), external_data=data
            ).result_rows
        except Exception as exc:
            raise _failure(exc, sql, self._password) from exc
        return [tuple(r) for r in rows]

    def command_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> None:
        text, data = self._external(sql, inputs)
        try:
            self._client.raw_query(text, parameters=dict(params or {}), external_data=data)
        except Exception as exc:
            raise _failure(exc, sql, self._password) from exc

    @staticmethod
    def _external(sql: str, inputs: Mapping[str, pa.Table]) -> tuple[str, Any]:
        """The inputs as ClickHouse external tables (Parquet), referred to by name."""
        from clickhouse_connect.driver.external import ExternalData

        data = ExternalData()
        for name in inputs_in(sql, inputs):
            table = inputs[name]
            buf = io.BytesIO()
            pq.write_table(table, buf)
            structure = [f"{f.name} {clickhouse_type(f.type)}" for f in table.schema]
            data.add_file(file_name=name, data=buf.getvalue(), fmt="Parquet", structure=structure)
        return INPUT.sub(lambda m: m.group(1), sql), data

    def close(self) -> None:
        self._client.close()


def clickhouse_type(t: pa.DataType) -> str:
    """The ClickHouse type an Arrow column of the store's inputs is read as."""
    if pa.types.is_string(t):
        return "String"
    if pa.types.is_boolean(t):
        return "Bool"
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


def _failure(exc: Exception, sql: str, password: str) -> StoreError:
    """clickhouse-connect's error as a StoreError of its kind (errors.py): the server's
    code from the exception (its X-ClickHouse-Exception-Code header) or its text; with
    none, no answer at all (OperationalError: refused, reset, timed out) or a gateway's
    5xx is worth a retry."""
    from clickhouse_connect.driver.exceptions import OperationalError

    message = _scrub(str(exc), password)
    code = getattr(exc, "code", None)
    if not isinstance(code, int):
        code = code_in(message)
    unreachable = code is None and (
        isinstance(exc, OperationalError | OSError) or _GATEWAY.search(message) is not None
    )
    return classified(message, code, sql, reachable=not unreachable)


def _scrub(message: str, secret: str) -> str:
    return message.replace(secret, "***") if secret else message
