"""Fast path of the decode stage: a batch of Confluent-framed messages -> Arrow columns.

The C module (consumer/decode/_avrofast.c) reads each message with a per-schema "program" and
writes columns, with no Python object per message. It is one-sided by design: a row comes
back decoded only when the reference decoder (consumer/decode/reference.py) certainly returns the
same event; every row it has any doubt about is flagged in `FastBatch.slow` and left empty,
and the caller decodes it with the reference. Besides malformed input that covers odd but
legal rows: repeated map keys, maps of more than 64 entries, non-minimal varints, and ids
(event_id, customer_id, a non-empty cancels) that are empty, longer than 200 bytes or do
not start with a printable ASCII character.

`compile_program` accepts only writer schemas whose resolution it fully implements, and
checks each one against the reference on a trial message before it hands the program out.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fastavro
import numpy as np
import numpy.typing as npt
import pyarrow as pa

from consumer import crash_points
from consumer.decode.event import DecodedEvent, DecodeError
from consumer.decode.wire import header_schema_id

try:
    from consumer.decode import _avrofast
except ImportError as exc:  # installed where no C compiler was: fastavro decodes every row
    _avrofast = None  # type: ignore[assignment]
    UNAVAILABLE = f"the C extension is not built ({exc})"
else:
    UNAVAILABLE = ""

STRING_FIELDS = ("event_id", "event_name", "customer_id", "cancels")
_DECIMAL = pa.decimal128(38, 9)

# The program format; consumer/decode/_avrofast.c validates it against the same numbers.
_MAGIC, _VERSION = 0xAF, 1
_OP = {"event_id": 1, "event_name": 2, "customer_id": 3, "cancels": 4, "source": 5}
_OP_VALUE, _OP_TIMESTAMP, _OP_PROPERTIES, _OP_SKIP = 6, 7, 8, 9
_T = {
    "null": 0,
    "boolean": 1,
    "int": 2,
    "long": 3,
    "float": 4,
    "double": 5,
    "string": 6,
    "bytes": 7,
    "fixed": 8,
    "enum": 9,
    "array": 10,
    "map": 11,
}
_MAX_DEPTH = 8
_INT32_MAX = 2**31 - 1

_STRINGS = frozenset(_OP)
_REQUIRED = frozenset({"event_id", "event_name", "customer_id", "value", "timestamp"})
# Reader fields a writer may omit, with the only defaults the C side knows how to fill.
_DEFAULTS: dict[str, Any] = {"properties": {}, "source": "", "cancels": ""}
_READER_FIELDS = _REQUIRED | frozenset(_DEFAULTS)
_PRECISION, _SCALE = 38, 9

_FNV_OFFSET, _FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3
_U64 = 2**64 - 1


@dataclass(frozen=True)
class FastBatch:
    """Columns of one batch, a row a message. Slow rows hold "", 0 and {} everywhere but
    `schema_id`, which is the frame's id whenever the header is readable."""

    n: int
    slow: npt.NDArray[np.bool_]  # rows the caller must decode with the reference
    schema_id: npt.NDArray[np.uint32]
    event_id: pa.StringArray
    event_name: pa.StringArray
    customer_id: pa.StringArray
    cancels: pa.StringArray
    value: pa.Array  # decimal128(38, 9)
    timestamp: npt.NDArray[np.int64]
    properties: pa.MapArray  # map<string, string>
    id_hash: npt.NDArray[np.uint64]  # id_hash_bytes(event_id's UTF-8)


def decode_batch(values: Sequence[bytes | None], programs: Mapping[int, bytes]) -> FastBatch:
    """Decode every message whose schema id has a program (see `compile_program`); rows
    keep the order of `values`. Raises TypeError/ValueError for a malformed program.
    Without the C extension every row is slow (`programs` must then be empty)."""
    if _avrofast is None:
        assert not programs, "no C extension: there are no programs to run"
        return _all_slow(values)
    (
        n,
        slow,
        schema_id,
        *strings,
        value,
        timestamp,
        map_offsets,
        key_offsets,
        key_data,
        item_offsets,
        item_data,
        id_hash,
    ) = _avrofast.decode(values, programs)
    cols = [_strings(n, strings[2 * k], strings[2 * k + 1]) for k in range(len(STRING_FIELDS))]
    entries = len(key_offsets) // 4 - 1
    properties = pa.MapArray.from_arrays(
        pa.Array.from_buffers(pa.int32(), n + 1, [None, pa.py_buffer(map_offsets)]),
        _strings(entries, key_offsets, key_data),
        _strings(entries, item_offsets, item_data),
    )
    event_id, event_name, customer_id, cancels = cols
    return FastBatch(
        n,
        np.frombuffer(memoryview(slow), np.bool_),
        np.frombuffer(memoryview(schema_id), np.uint32),
        event_id,
        event_name,
        customer_id,
        cancels,
        pa.Array.from_buffers(_DECIMAL, n, [None, pa.py_buffer(value)]),
        np.frombuffer(memoryview(timestamp), np.int64),
        properties,
        np.frombuffer(memoryview(id_hash), np.uint64),
    )


def _all_slow(values: Sequence[bytes | None]) -> FastBatch:
    """The batch the C side returns when it has no program: every row left to the reference."""
    n = len(values)
    empty = pa.array([""] * n, pa.string())
    none = pa.array([], pa.string())
    ids = [header_schema_id(v) for v in values]
    return FastBatch(
        n,
        np.ones(n, np.bool_),
        np.array([0 if i is None else i for i in ids], np.uint32),
        empty,
        empty,
        empty,
        empty,
        pa.array([0] * n, pa.int64()).cast(_DECIMAL),
        np.zeros(n, np.int64),
        pa.MapArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), none, none),
        np.zeros(n, np.uint64),
    )


def _strings(n: int, offsets: _avrofast.Buffer, data: _avrofast.Buffer) -> pa.StringArray:
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def schema_ids(values: Sequence[bytes | None]) -> list[int]:
    """Sorted distinct schema ids named by well-formed headers (magic 0, 5 bytes or more),
    as `Decoder.named_schema_ids` returns them in Confluent mode. Untrusted bytes: called
    only once a range's intent is durable, so a crash here counts against it (P7)."""
    crash_points.reading_headers(values)  # a crash test's hook; none in production
    if _avrofast is None:
        return sorted({i for i in map(header_schema_id, values) if i is not None})
    return _avrofast.schema_ids(values)


def hash_strings(values: Sequence[str]) -> npt.NDArray[np.uint64]:
    """`id_hash_bytes` of each string's UTF-8 bytes (filter rebuilds)."""
    if _avrofast is None:
        return np.fromiter((id_hash_bytes(v.encode()) for v in values), np.uint64, len(values))
    return np.frombuffer(memoryview(_avrofast.hash_strings(values)), np.uint64)


def id_hash_bytes(data: bytes) -> int:
    """The id hash the C side computes: FNV-1a 64 over the bytes, then splitmix64's
    finalizer (FNV alone leaves the high bits poorly mixed for short, similar ids)."""
    h = _FNV_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _U64
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _U64
    return h ^ (h >> 31)


# ---------------------------------------------------------------------------------------
# Programs


class _Unsupported(Exception):
    """The fast path cannot read this schema (the reference may still)."""


ReferenceFor = Callable[[Any, Any], Callable[[bytes], DecodedEvent]]


def compile_program(writer: Any, reader: Any, reference: ReferenceFor) -> bytes | None:
    """The fast path's plan for one writer schema (both as returned by fastavro.parse_schema,
    logical types included), or None when the fast path cannot read it: the caller then
    decodes every message of that schema id with the reference decoder. `reference`
    gives the reference's reading of (writer, reader), which the program must match."""
    if _avrofast is None:
        return None
    try:
        _check_reader(reader)
        program = _compile(writer, reader)
        _check_against_reference(program, writer, reader, reference)
    except (_Unsupported, KeyError, TypeError, ValueError, AttributeError):
        return None
    return program


def _base(node: Any) -> tuple[Any, Any]:
    """(type, logicalType) of a field type in either spelling ("long" or {"type": ...})."""
    if isinstance(node, dict):
        return node.get("type"), node.get("logicalType")
    return node, None


def _fields(schema: Any) -> list[dict[str, Any]]:
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise _Unsupported("not a record")
    fields = schema["fields"]
    names = [f["name"] for f in fields]
    if len(set(names)) != len(names):
        raise _Unsupported("repeated field names")
    return list(fields)


def _unqualified(schema: dict[str, Any]) -> str:
    return str(schema["name"]).rsplit(".", 1)[-1]


def _check_reader(reader: Any) -> None:
    """Only the v4 shape: the C side writes exactly these columns and defaults."""
    fields = {f["name"]: f for f in _fields(reader)}
    if set(fields) != _READER_FIELDS or reader.get("aliases"):
        raise _Unsupported("reader is not the usage event shape")
    for name, field in fields.items():
        if field.get("aliases"):
            raise _Unsupported("reader field aliases")
        ok = _field_op(name, field["type"]) is not None
        if name == "value":
            ftype = field["type"]
            ok = ok and ftype["precision"] == _PRECISION and ftype.get("scale", 0) == _SCALE
        if name in _DEFAULTS:
            default = field.get("default", object())
            ok = ok and type(default) is type(_DEFAULTS[name]) and default == _DEFAULTS[name]
        if not ok:
            raise _Unsupported(f"reader field {name}")


def _field_op(name: str, ftype: Any) -> bytes | None:
    """The op reading writer field `name` into the reader field of the same name, or None
    when the types differ (the reference then resolves, promotes or refuses)."""
    base, logical = _base(ftype)
    if name in _STRINGS:
        return bytes([_OP[name]]) if base == "string" else None
    if name == "value":
        if base != "bytes" or logical != "decimal":
            return None
        precision, scale = ftype.get("precision"), ftype.get("scale", 0)
        if type(precision) is not int or type(scale) is not int:
            return None
        return bytes([_OP_VALUE]) if scale == _SCALE and precision <= _PRECISION else None
    if name == "timestamp":
        ok = base == "long" and logical == "timestamp-millis"
        return bytes([_OP_TIMESTAMP]) if ok else None
    if name == "properties":
        ok = base == "map" and _base(ftype.get("values"))[0] == "string"
        return bytes([_OP_PROPERTIES]) if ok else None
    return None


def _skip_type(node: Any, depth: int = 0) -> bytes:
    """A skipped writer type. Unions, records and references to named types are not
    supported (the schema then goes to the reference)."""
    base, _ = _base(node)
    if depth > _MAX_DEPTH or not isinstance(base, str) or base not in _T:
        raise _Unsupported(f"cannot skip {base!r}")
    if base == "fixed":
        size = node["size"]
        if type(size) is not int or not 0 <= size <= _INT32_MAX:
            raise _Unsupported("fixed size")
        return bytes([_T[base]]) + size.to_bytes(4, "little")
    if base == "enum":
        count = len(node["symbols"])
        if not 0 < count <= _INT32_MAX:
            raise _Unsupported("enum symbols")
        return bytes([_T[base]]) + count.to_bytes(4, "little")
    if base == "array":
        return bytes([_T[base]]) + _skip_type(node["items"], depth + 1)
    if base == "map":
        return bytes([_T[base]]) + _skip_type(node["values"], depth + 1)
    return bytes([_T[base]])


def _compile(writer: Any, reader: Any) -> bytes:
    wfields = _fields(writer)
    if _unqualified(writer) != _unqualified(reader):
        raise _Unsupported("record names differ")  # fastavro's resolution refuses it
    readable = {f["name"] for f in _fields(reader)}
    out = bytearray([_MAGIC, _VERSION])
    present: set[str] = set()
    for field in wfields:
        name = field["name"]
        if name in readable:
            op = _field_op(name, field["type"])
            if op is None:
                raise _Unsupported(f"writer field {name} needs resolution")
            out += op
            present.add(name)
        else:
            out += bytes([_OP_SKIP]) + _skip_type(field["type"])
    if not present >= _REQUIRED:
        raise _Unsupported("a required field is missing")
    return bytes(out)


def _trial_value(node: Any) -> Any:
    """A value of a skipped type for the trial message (schema without logical types)."""
    base, _ = _base(node)
    trial: dict[str, Any] = {
        "null": None,
        "boolean": True,
        "int": 7,
        "long": 7,
        "float": 1.5,
        "double": 1.5,
        "string": "s",
        "bytes": b"b",
    }
    if base in trial:
        return trial[base]
    if base == "fixed":
        return b"f" * node["size"]
    if base == "enum":
        return node["symbols"][-1]
    if base == "array":
        return [_trial_value(node["items"])]
    if base == "map":
        return {"k": _trial_value(node["values"])}
    raise _Unsupported(f"no trial value for {base!r}")


def without_logical(node: Any) -> Any:
    """The schema as the reference reads it, ready to re-parse: a copy without logical
    types and fastavro's bookkeeping keys."""
    if isinstance(node, dict):
        return {
            k: without_logical(v)
            for k, v in node.items()
            if k != "logicalType" and not k.startswith("__")
        }
    if isinstance(node, list):
        return [without_logical(v) for v in node]
    return node


def _check_against_reference(
    program: bytes, writer: Any, reader: Any, reference_for: ReferenceFor
) -> None:
    """Decode one message with every field present both ways; refuse the program unless
    the reference accepts the schema and both agree. Guards against any resolution rule of
    fastavro's that the program does not model."""
    try:
        reference = reference_for(writer, reader)
    except ValueError as exc:
        raise _Unsupported(f"the reference refuses the schema: {exc}") from None
    known: dict[str, Any] = {
        "event_id": "evt-1",
        "event_name": "api_call",
        "customer_id": "cus_1",
        "cancels": "evt-0",
        "source": "src",
        "value": (1500000000).to_bytes(5, "big", signed=True),
        "timestamp": 1_763_000_000_123,
        "properties": {"region": "eu", "tier": ""},
    }
    stripped: Any = fastavro.parse_schema(without_logical(writer))
    record = {
        f["name"]: known[f["name"]] if f["name"] in known else _trial_value(f["type"])
        for f in stripped["fields"]
    }
    body = io.BytesIO()
    fastavro.schemaless_writer(body, stripped, record)
    try:
        want = reference(body.getvalue())
    except DecodeError as exc:
        raise _Unsupported(f"the reference refuses the trial message: {exc}") from None
    batch = decode_batch([b"\0\0\0\0\0" + body.getvalue()], {0: program})
    if batch.slow[0]:
        raise _Unsupported("the fast path refuses the trial message")
    got = DecodedEvent(
        batch.event_id[0].as_py(),
        batch.event_name[0].as_py(),
        batch.customer_id[0].as_py(),
        batch.value[0].as_py(),
        int(batch.timestamp[0]),
        dict(batch.properties[0].as_py()),
        0,
        batch.cancels[0].as_py(),
    )
    if got != want:
        raise _Unsupported(f"the fast path reads {got}, the reference {want}")
