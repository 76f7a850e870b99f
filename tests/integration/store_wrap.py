"""The base of the tests' wrappers around a real backend: every call goes through `check`
(the statement, or `INSERT INTO <table>` for a column insert) and then to the backend, so
a wrapper overrides only the calls it changes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from consumer.store.backend import Backend, Row


class Passthrough:
    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    def check(self, text: str) -> None:
        """Called before every call with what it does; raise to fail it."""

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self.check(sql)
        self.inner.command(sql, params)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        self.check(sql)
        return self.inner.query(sql, params)

    def query_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> list[Row]:
        self.check(sql)
        return self.inner.query_with(sql, inputs, params)

    def command_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> None:
        self.check(sql)
        self.inner.command_with(sql, inputs, params)

    def insert_columns(self, table: str, columns: Mapping[str, pa.Array], token: str = "") -> None:
        self.check(f"INSERT INTO {table}")
        self.inner.insert_columns(table, columns, token)

    def close(self) -> None:
        self.inner.close()
