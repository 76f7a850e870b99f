"""ClickHouse faults injected at the backend interface, for the crash harness only.

A spec "rate=0.05,timeout=0.02,seed=1" makes each call fail with probability `rate`, as an
error or (with probability `timeout`) after hanging 2 s, like a server that times out.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from consumer.store.backend import Backend, Row, StoreUnavailable


class FaultyBackend:
    def __init__(self, inner: Backend, rate: float, timeout: float, seed: int) -> None:
        self._inner = inner
        self._rate = rate
        self._timeout = timeout
        # Per process: a restarted consumer must not meet the very same failure sequence.
        self._rng = random.Random(f"{seed}-{os.getpid()}")

    def _maybe_fail(self, what: str) -> None:
        r = self._rng.random()
        if r < self._timeout:
            time.sleep(2.0)
            raise StoreUnavailable(f"injected timeout in {what}")
        if r < self._rate:
            raise StoreUnavailable(f"injected error in {what}")

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        if not sql.lstrip().startswith(("CREATE", "INSERT INTO schema_migrations")):
            self._maybe_fail("command")  # schema changes pass: the data path is under test
        self._inner.command(sql, params)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        if "schema_migrations" not in sql:
            self._maybe_fail("query")
        return self._inner.query(sql, params)

    def query_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> list[Row]:
        self._maybe_fail("query")
        return self._inner.query_with(sql, inputs, params)

    def command_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> None:
        self._maybe_fail("command")
        self._inner.command_with(sql, inputs, params)

    def insert_columns(self, table: str, columns: Mapping[str, pa.Array], token: str = "") -> None:
        self._maybe_fail(f"insert into {table}")
        self._inner.insert_columns(table, columns, token)

    def close(self) -> None:
        self._inner.close()


def from_spec(inner: Backend, spec: str) -> Backend:
    """The backend with the faults `spec` names ("" leaves it as is)."""
    if not spec:
        return inner
    opts = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
    return FaultyBackend(
        inner, float(opts.get("rate", 0)), float(opts.get("timeout", 0)), int(opts.get("seed", 0))
    )
