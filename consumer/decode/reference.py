"""Decode stage: Kafka message bytes -> DecodedEvent.

Every writer version (v1, v2, v3, ...) is resolved into the current reader schema, so the
later stages see one shape. Failures are split by kind: a DecodeError is permanent and
becomes a dead letter; SchemaSourceUnavailable is transient and propagates so the caller
pauses and retries (P6).

Speed: the per-schema-id resolution is prepared once and cached. Decoding runs on copies
of both schemas with the logical types removed, and the two logical fields are converted
here: that is about twice as fast as fastavro's conversions and also exact where those
are not (fastavro rounds decimals to the schema precision and turns timestamps into
datetimes that cannot hold every long).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Context, Decimal, Inexact
from typing import Any, Literal

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.schema import to_parsing_canonical_form

from consumer.decode import fast as avrofast
from consumer.decode.event import DecodedEvent, DecodeError
from consumer.decode.schemas import SchemaSource, UnknownSchemaId
from consumer.decode.wire import HEADER_SIZE, MAGIC, header_schema_id

_SCHEMA_ID = struct.Struct(">I").unpack_from
# Everything fastavro's reader raises on malformed input (UnicodeDecodeError is a
# ValueError; a length prefix larger than the message ends in EOFError).
_AVRO_ERRORS = (EOFError, ValueError, IndexError, KeyError, OverflowError, struct.error)
_DETAIL_CHARS = 160
_MAX_FAILED_IDS = 10_000


def _fields(schema: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise DecodeError("wrong_type", "writer schema is not a record")
    return {f["name"]: f for f in schema["fields"]}


def _logical(field: dict[str, Any]) -> tuple[Any, Any]:
    ftype = field["type"]
    if not isinstance(ftype, dict):
        return ftype, None
    return ftype.get("type"), ftype.get("logicalType")


@dataclass(frozen=True, slots=True)
class _Plan:
    """How to read one writer schema into the reader shape."""

    writer: Any
    reader: Any | None  # None when the layouts are equal: fastavro then skips resolution
    has_properties: bool


@dataclass(frozen=True, slots=True)
class _Reader:
    """The reader schema, checked and prepared once."""

    parsed: Any
    stripped: Any
    canonical: str
    scale: int
    precision: int

    @classmethod
    def of(cls, reader: Any) -> _Reader:
        fields = _fields(reader)
        value_type = fields["value"]["type"]
        if _logical(fields["value"]) != ("bytes", "decimal"):
            raise ValueError("reader schema: value must be a bytes decimal")
        if _logical(fields["timestamp"]) != ("long", "timestamp-millis"):
            raise ValueError("reader schema: timestamp must be timestamp-millis")
        stripped = fastavro.parse_schema(avrofast.without_logical(reader))
        return cls(
            reader,
            stripped,
            to_parsing_canonical_form(stripped),
            int(value_type.get("scale", 0)),
            int(value_type["precision"]),
        )

    def plan(self, writer: Any) -> _Plan:
        """Check what fastavro cannot see once logical types are removed; raise DecodeError."""
        wfields = _fields(writer)
        for name, rfield in _fields(self.parsed).items():
            if name not in wfields and "default" not in rfield:
                raise DecodeError("missing_field", f"writer schema has no {name!r} field")
        self._check_value(wfields["value"])
        if _logical(wfields["timestamp"]) != ("long", "timestamp-millis"):
            raise DecodeError("wrong_type", "writer timestamp is not a timestamp-millis long")
        stripped = fastavro.parse_schema(avrofast.without_logical(writer))
        same = to_parsing_canonical_form(stripped) == self.canonical
        return _Plan(stripped, None if same else self.stripped, "properties" in wfields)

    def _check_value(self, field: dict[str, Any]) -> None:
        """Same scale, precision no larger: every writer value is then exact in the reader."""
        ftype = field["type"]
        if _logical(field) != ("bytes", "decimal"):
            raise DecodeError("wrong_type", "writer value is not a bytes decimal")
        scale, precision = ftype.get("scale", 0), ftype.get("precision")
        if not isinstance(precision, int) or scale != self.scale or precision > self.precision:
            raise DecodeError(
                "wrong_type",
                f"writer value is decimal({precision},{scale}), "
                f"reader needs decimal(<={self.precision},{self.scale})",
            )


class Decoder:
    """Decodes Confluent-framed or plain Avro messages into DecodedEvent.

    `schema_ids_seen` collects every writer schema id that resolved, so a range can record
    the schemas its outcome depended on; the caller may clear it between ranges.
    """

    def __init__(
        self,
        *,
        mode: Literal["confluent", "plain"],
        source: SchemaSource | None,
        reader: Any,
        plain_writer: Any | None = None,
        fast: bool = True,
    ) -> None:
        """`fast`: run the C fast path where it can read a schema (consumer/decode/fast.py);
        off, or without the C extension, the reference decodes every message."""
        if mode == "confluent" and source is None:
            raise ValueError("confluent mode needs a schema source")
        if mode == "plain" and plain_writer is None:
            raise ValueError("plain mode needs the writer schema")
        self._confluent = mode == "confluent"
        self.fast = fast and not avrofast.UNAVAILABLE
        self._source = source
        self._reader = _Reader.of(reader)
        self._plans: dict[int, _Plan] = {}
        self._programs: dict[int, bytes | None] = {}
        self._failed: dict[int, tuple[str, str]] = {}
        self._limit = 10**self._reader.precision
        self._exact = Context(prec=self._reader.precision + 2, traps=[Inexact])
        self._neg_scale = -self._reader.scale
        self._plain: _Plan | None = None
        if plain_writer is not None:
            try:
                self._plain = self._reader.plan(plain_writer)
            except DecodeError as exc:
                raise ValueError(f"plain writer schema cannot be read: {exc}") from None
        self.schema_ids_seen: set[int] = set()

    def decode(self, data: bytes | None) -> DecodedEvent:
        """Raises DecodeError (permanent) or SchemaSourceUnavailable (transient)."""
        if not data:
            raise DecodeError("empty", "message has no value")
        if self._confluent:
            schema_id = self._schema_id(data)
            plan = self._plans.get(schema_id) or self._plan_for(schema_id)
            offset = HEADER_SIZE
        else:
            assert self._plain is not None
            schema_id, plan, offset = 0, self._plain, 0
        self.schema_ids_seen.add(schema_id)
        return self._read(data, offset, plan, schema_id)

    def named_schema_ids(self, values: Iterable[bytes | None]) -> list[int]:
        """Schema ids the messages' headers name, read without decoding or a registry, so an
        intent can record them before the range is classified (P1)."""
        if not self._confluent:
            return []
        return sorted({i for i in map(header_schema_id, values) if i is not None})

    def programs(self, schema_ids: Iterable[int]) -> dict[int, bytes]:
        """The fast path's programs (consumer/decode/fast.py) for these writer schema ids, cached
        as plans are. An id the fast path cannot read, or that is unknown or incompatible,
        has none: its messages go to `decode`, which names the failure. Raises
        SchemaSourceUnavailable (transient) like `decode`."""
        out: dict[int, bytes] = {}
        if not self._confluent or not self.fast:
            return out  # plain Avro has no frame, or no fast path: every message takes `decode`
        for schema_id in schema_ids:
            if schema_id not in self._programs:
                program = None
                if schema_id not in self._failed:
                    assert self._source is not None
                    try:
                        writer = self._source.writer_schema(schema_id)
                    except UnknownSchemaId:
                        continue  # not cached: a new id may just not have propagated yet
                    program = avrofast.compile_program(writer, self._reader.parsed, plain_reader)
                self._programs[schema_id] = program
            found = self._programs[schema_id]
            if found is not None:
                out[schema_id] = found
        return out

    @staticmethod
    def _schema_id(data: bytes) -> int:
        if data[0] != MAGIC:
            raise DecodeError("bad_magic", f"first byte is {data[0]}, not {MAGIC}")
        if len(data) < HEADER_SIZE:
            raise DecodeError("truncated_header", f"{len(data)} bytes, header needs {HEADER_SIZE}")
        schema_id: int = _SCHEMA_ID(data, 1)[0]
        return schema_id

    def _plan_for(self, schema_id: int) -> _Plan:
        """Resolve and cache one schema id; incompatible schemas are cached as failures
        (ids are immutable), unknown ids are not (a new id may just not have propagated)."""
        failed = self._failed.get(schema_id)
        if failed is not None:
            raise DecodeError(*failed)
        assert self._source is not None
        try:
            writer = self._source.writer_schema(schema_id)
        except UnknownSchemaId as exc:
            raise DecodeError("unknown_schema_id", str(exc)) from None
        try:
            plan = self._reader.plan(writer)
        except DecodeError as exc:
            if len(self._failed) < _MAX_FAILED_IDS:
                self._failed[schema_id] = (exc.reason, f"schema id {schema_id}: {exc.detail}")
            raise DecodeError(exc.reason, f"schema id {schema_id}: {exc.detail}") from None
        self._plans[schema_id] = plan
        return plan

    def _read(self, data: bytes, offset: int, plan: _Plan, schema_id: int) -> DecodedEvent:
        fo = io.BytesIO(data)
        fo.seek(offset)
        try:
            rec: Any = fastavro.schemaless_reader(fo, plan.writer, plan.reader)
        except SchemaResolutionError as exc:
            raise DecodeError("wrong_type", str(exc)[:_DETAIL_CHARS]) from None
        except _AVRO_ERRORS as exc:
            detail = f"{type(exc).__name__}: {str(exc)[:_DETAIL_CHARS]}"
            raise DecodeError("avro_decode_error", detail) from None
        end = fo.tell()
        if end != len(data):
            raise DecodeError("trailing_bytes", f"{len(data) - end} bytes after the record")
        return DecodedEvent(
            rec["event_id"],
            rec["event_name"],
            rec["customer_id"],
            self._decimal(rec["value"]),
            rec["timestamp"],
            rec["properties"] if plan.has_properties else {},
            schema_id,
            rec.get("cancels", ""),
        )

    def _decimal(self, raw: bytes) -> Decimal:
        """Two's-complement big-endian unscaled integer -> Decimal, exactly. No bytes at all
        is no number: Java Avro refuses it, so a producer's bug is not billed as zero."""
        if not raw:
            raise DecodeError("avro_decode_error", "value is a decimal of zero bytes")
        unscaled = int.from_bytes(raw, "big", signed=True)
        if not -self._limit < unscaled < self._limit:
            raise DecodeError("wrong_type", f"value has more than {self._reader.precision} digits")
        return Decimal(unscaled).scaleb(self._neg_scale, self._exact)


def plain_reader(writer: Any, reader: Any) -> Callable[[bytes], DecodedEvent]:
    """The reference's reading of unframed messages of one writer schema: what the fast
    path's program for that schema must agree with."""
    return Decoder(mode="plain", source=None, reader=reader, plain_writer=writer).decode
