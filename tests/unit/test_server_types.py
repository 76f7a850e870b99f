"""Every Arrow column the run path sends the server as an input table has a ClickHouse type.

The server backend names each external table's structure from its Arrow schema
(`clickhouse_type`); a column type it does not know fails every statement that sends it,
on the server backend only (chDB reads Arrow directly). A bool added to the dedup
candidates did exactly that."""

from __future__ import annotations

import pyarrow as pa
import pytest

from consumer.classify.classifier import CANDIDATE_SCHEMA
from consumer.decode.columns import LEDGER_SCHEMA
from consumer.emitter.plan.queue import _NAMES
from consumer.store.server import clickhouse_type


@pytest.mark.parametrize("schema", [CANDIDATE_SCHEMA, LEDGER_SCHEMA, _NAMES])
def test_every_input_column_has_a_clickhouse_type(schema: pa.Schema) -> None:
    for field in schema:
        assert clickhouse_type(field.type)


def test_types() -> None:
    assert clickhouse_type(pa.bool_()) == "Bool"
    assert clickhouse_type(pa.uint32()) == "UInt32"
    assert clickhouse_type(pa.int64()) == "Int64"
    assert clickhouse_type(pa.decimal128(38, 12)) == "Decimal(38, 12)"
    assert clickhouse_type(pa.map_(pa.string(), pa.string())) == "Map(String, String)"
    with pytest.raises(ValueError, match="no ClickHouse type"):
        clickhouse_type(pa.float16())
