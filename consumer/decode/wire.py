"""Encoding shared by the producer helper, the tests and the demo.

Confluent framing is `0x00 | schema id (4 bytes, big endian) | Avro body`; the decoder
relies on exactly this layout, so both sides take it from here.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from typing import Any

import fastavro

MAGIC = 0
HEADER = struct.Struct(">BI")
HEADER_SIZE = HEADER.size  # 5
_MAX_SCHEMA_ID = 2**32 - 1


def header_schema_id(value: bytes | None) -> int | None:
    """The schema id a well-formed Confluent header names (magic 0, 5 bytes or more)."""
    if value is None or len(value) < HEADER_SIZE or value[0] != MAGIC:
        return None
    schema_id: int = HEADER.unpack_from(value)[1]
    return schema_id


def frame_confluent(schema_id: int, payload: bytes) -> bytes:
    """Prefix an Avro body with the Confluent header."""
    if not 0 <= schema_id <= _MAX_SCHEMA_ID:
        raise ValueError(f"schema id {schema_id} does not fit in 4 bytes")
    return HEADER.pack(MAGIC, schema_id) + payload


def encode_event(record: Mapping[str, Any], parsed_schema: Any) -> bytes:
    """Schemaless Avro (no header): what plain mode carries and Confluent mode wraps."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed_schema, dict(record))
    return buf.getvalue()


def encode_confluent(record: Mapping[str, Any], parsed_schema: Any, schema_id: int) -> bytes:
    return frame_confluent(schema_id, encode_event(record, parsed_schema))
