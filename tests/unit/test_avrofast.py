"""The fast path against the reference decoder: a fast row is always the reference's event,
a row the reference rejects is always slow, and ordinary rows are fast."""

from __future__ import annotations

import copy
import io
import resource
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import fastavro
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.decode import fast as avrofast
from consumer.decode.event import DecodedEvent
from consumer.decode.fast import (
    FastBatch,
    compile_program,
    decode_batch,
    id_hash_bytes,
    without_logical,
)
from consumer.decode.reference import Decoder, plain_reader
from consumer.decode.schemas import SCHEMAS_DIR, UnknownSchemaId, load_schema, reader_schema
from consumer.decode.wire import encode_confluent, frame_confluent
from consumer.local.sample import generate
from tests.fuzz.model import zz

V1 = load_schema(SCHEMAS_DIR / "usage_event.v1.avsc")
V2 = load_schema(SCHEMAS_DIR / "usage_event.v2.avsc")
V3 = load_schema(SCHEMAS_DIR / "usage_event.v3.avsc")
V4 = reader_schema()
VERSIONS = {1: V1, 2: V2, 3: V3, 4: V4}
LIMIT = 10**38
INT64 = (-(2**63), 2**63 - 1)
FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class DictSource:
    def __init__(self, schemas: dict[int, Any]) -> None:
        self.schemas = schemas

    def writer_schema(self, schema_id: int) -> Any:
        try:
            return self.schemas[schema_id]
        except KeyError:
            raise UnknownSchemaId(f"no schema id {schema_id}") from None


def programs_for(schemas: dict[int, Any]) -> dict[int, bytes]:
    out = {}
    for sid, writer in schemas.items():
        program = compile_program(writer, V4, plain_reader)
        if program is not None:
            out[sid] = program
    return out


def odd_id(s: str) -> bool:
    b = s.encode()
    return not b or len(b) > 200 or not 0x21 <= b[0] <= 0x7E


def row(batch: FastBatch, i: int) -> DecodedEvent:
    return DecodedEvent(
        batch.event_id[i].as_py(),
        batch.event_name[i].as_py(),
        batch.customer_id[i].as_py(),
        batch.value[i].as_py(),
        int(batch.timestamp[i]),
        dict(batch.properties[i].as_py()),
        int(batch.schema_id[i]),
        batch.cancels[i].as_py(),
    )


def framed_id(v: bytes | None) -> int:
    return int.from_bytes(v[1:5], "big") if v is not None and len(v) >= 5 and v[0] == 0 else 0


def check(
    values: Sequence[bytes | None],
    schemas: dict[int, Any],
    programs: dict[int, bytes] | None = None,
) -> tuple[FastBatch, list[DecodedEvent | None]]:
    """The contract, row by row; returns the batch and the reference's events."""
    batch = decode_batch(values, programs_for(schemas) if programs is None else programs)
    reference = Decoder(mode="confluent", source=DictSource(schemas), reader=V4)
    assert batch.n == len(values)
    for col in (batch.slow, batch.schema_id, batch.timestamp, batch.id_hash):
        assert len(col) == len(values)
    for col in (batch.event_id, batch.event_name, batch.customer_id, batch.cancels):
        assert len(col) == len(values)
    assert len(batch.value) == len(batch.properties) == len(values)
    wants: list[DecodedEvent | None] = []
    for i, v in enumerate(values):
        want: DecodedEvent | None
        try:
            want = reference.decode(v)
        except Exception:  # any refusal, whatever its kind, must leave the row slow
            want = None
        wants.append(want)
        assert int(batch.schema_id[i]) == framed_id(v)
        if batch.slow[i]:
            assert row(batch, i) == DecodedEvent("", "", "", Decimal(0), 0, {}, framed_id(v))
            assert batch.id_hash[i] == 0
            continue
        assert want is not None, f"row {i} is fast but the reference refuses {v!r}"
        assert row(batch, i) == want
        assert batch.value[i].as_py().as_tuple().exponent == -9
        assert int(batch.id_hash[i]) == id_hash_bytes(want.event_id.encode())
    return batch, wants


def ordinary(event: DecodedEvent | None) -> bool:
    """Rows the fast path must take (given canonical encoding and no repeated keys)."""
    return (
        event is not None
        and not odd_id(event.event_id)
        and not odd_id(event.customer_id)
        and not (event.cancels and odd_id(event.cancels))
        and len(event.properties) <= 64
    )


# --- strategies ----------------------------------------------------------------------------

texts = st.text(max_size=24)
ids = st.one_of(
    st.builds(
        str.__add__,
        st.characters(min_codepoint=0x21, max_codepoint=0x7E),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    ),
    st.text(max_size=12),
    st.text(alphabet="a\u00e9\U0001f600", min_size=60, max_size=110),  # 195..205 bytes and more
    st.sampled_from(
        ["", " ", "\x7f", "\t", " evt", "\u00a0e", "\u2028x", "~", "e" * 200, "e" * 201]
    ),
)
unscaled = st.one_of(
    st.integers(-(LIMIT - 1), LIMIT - 1),
    st.integers(-(10**12), 10**12),
    st.sampled_from([0, 1, -1, LIMIT - 1, -(LIMIT - 1), 2**63, -(2**63), 2**64, -(2**127) // 10]),
)
timestamps = st.one_of(st.integers(*INT64), st.sampled_from([*INT64, 0, -1, 1_763_000_000_123]))
maps = st.dictionaries(texts, texts, max_size=6)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "event_id": draw(ids),
        "event_name": draw(texts),
        "customer_id": draw(ids),
        "value": Decimal(draw(unscaled)).scaleb(-9),
        "timestamp": draw(timestamps),
        "properties": draw(maps),
        "source": draw(texts),
        "cancels": draw(st.one_of(st.just(""), ids)),
    }


def shaped(rec: dict[str, Any], writer: Any) -> dict[str, Any]:
    names = {f["name"] for f in writer["fields"]}
    return {k: v for k, v in rec.items() if k in names}


# --- the v1..v4 writers, encoded by fastavro with their logical types -----------------------


@FUZZ
@given(st.lists(st.tuples(events(), st.sampled_from([1, 2, 3, 4])), min_size=1, max_size=8))
def test_every_version_matches_the_reference(rows: list[tuple[dict[str, Any], int]]) -> None:
    values = [encode_confluent(shaped(rec, VERSIONS[sid]), VERSIONS[sid], sid) for rec, sid in rows]
    batch, wants = check(values, VERSIONS)
    assert [bool(s) for s in batch.slow] == [not ordinary(w) for w in wants]


def test_sample_data_is_fast_except_the_undecodable() -> None:
    sample = generate(4200, 50, 4, 1_763_000_000_000, cancels=True)
    values = [m.value for m in sample.messages]
    batch, wants = check(values, VERSIONS)  # over 4096 rows: decoded without the GIL
    slow = {i for i in range(len(values)) if batch.slow[i]}
    assert slow == {i for i, m in enumerate(sample.messages) if m.kind == "undecodable"}
    assert all(w is None for i, w in enumerate(wants) if i in slow)


def test_threads_decode_at_once() -> None:
    values = [m.value for m in generate(5000, 50, 4, 1_763_000_000_000).messages]
    programs = programs_for(VERSIONS)
    want = decode_batch(values, programs)
    with ThreadPoolExecutor(4) as pool:
        for got in pool.map(lambda _: decode_batch(values, programs), range(8)):
            assert got.slow.tolist() == want.slow.tolist()
            assert got.event_id == want.event_id and got.properties == want.properties
            assert got.id_hash.tolist() == want.id_hash.tolist()


def test_empty_batch() -> None:
    batch = decode_batch([], {})
    assert batch.n == 0 and len(batch.event_id) == 0 and len(batch.properties) == 0


# --- random writer schemas: extra fields anywhere, optional fields missing -----------------

PRIMITIVES = ["null", "boolean", "int", "long", "float", "double", "string", "bytes"]


@st.composite
def skip_types(draw: st.DrawFn, depth: int = 0) -> Any:
    kinds = PRIMITIVES + ["fixed", "enum"] + (["array", "map"] if depth < 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "fixed":
        return {"type": "fixed", "name": "?", "size": draw(st.integers(0, 9))}
    if kind == "enum":
        symbols = [f"S{i}" for i in range(draw(st.integers(1, 4)))]
        return {"type": "enum", "name": "?", "symbols": symbols}
    if kind == "array":
        return {"type": "array", "items": draw(skip_types(depth + 1))}
    if kind == "map":
        return {"type": "map", "values": draw(skip_types(depth + 1))}
    if draw(st.booleans()):
        return {"type": kind}
    return kind


def name_types(node: Any, counter: list[int]) -> None:
    """Every named type gets a name of its own."""
    if isinstance(node, dict):
        if node.get("name") == "?":
            counter[0] += 1
            node["name"] = f"T{counter[0]}"
        for v in node.values():
            name_types(v, counter)
    elif isinstance(node, list):
        for v in node:
            name_types(v, counter)


def value_of(t: Any) -> st.SearchStrategy[Any]:
    kind = t["type"] if isinstance(t, dict) else t
    simple: dict[str, st.SearchStrategy[Any]] = {
        "null": st.none(),
        "boolean": st.booleans(),
        "int": st.integers(-(2**31), 2**31 - 1),
        "long": st.integers(*INT64),
        "float": st.floats(width=32),
        "double": st.floats(),
        "string": texts,
        "bytes": st.binary(max_size=12),
    }
    if kind in simple:
        return simple[kind]
    if kind == "fixed":
        return st.binary(min_size=t["size"], max_size=t["size"])
    if kind == "enum":
        return st.sampled_from(t["symbols"])
    if kind == "array":
        return st.lists(value_of(t["items"]), max_size=3)
    return st.dictionaries(texts, value_of(t["values"]), max_size=3)


READER_TYPES: dict[str, Any] = {f["name"]: f["type"] for f in V4["fields"]}


@st.composite
def writer_schemas(draw: st.DrawFn) -> Any:
    fields: list[dict[str, Any]] = [
        {"name": "event_id", "type": "string"},
        {"name": "event_name", "type": {"type": "string"} if draw(st.booleans()) else "string"},
        {"name": "customer_id", "type": "string"},
        {
            "name": "value",
            "type": {
                "type": "bytes",
                "logicalType": "decimal",
                "precision": draw(st.integers(9, 38)),
                "scale": 9,
            },
        },
        {"name": "timestamp", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    ]
    for name in draw(st.sets(st.sampled_from(["properties", "source", "cancels"]))):
        fields.append({"name": name, "type": copy.deepcopy(READER_TYPES[name])})
    for k in range(draw(st.integers(0, 4))):
        fields.append({"name": f"extra_{k}", "type": draw(skip_types())})
    fields = draw(st.permutations(fields))
    schema = {
        "type": "record",
        "name": "UsageEvent",
        "namespace": draw(st.sampled_from(["io.usageconsumer", "elsewhere"])),
        "fields": fields,
    }
    name_types(schema, [0])
    return fastavro.parse_schema(schema)


def decimal_bytes(n: int, pad: int = 0) -> bytes:
    """Two's complement big endian, with `pad` redundant sign bytes."""
    size = max(1, (n.bit_length() + 8) // 8) + pad
    return n.to_bytes(size, "big", signed=True)


@st.composite
def bodies(draw: st.DrawFn, writer: Any) -> bytes:
    """A fastavro-encoded body of the writer without logical types: raw decimal bytes
    (any size, padded, empty) and raw longs."""
    rec = draw(events())
    n = draw(unscaled)
    raw = b"" if n == 0 and draw(st.booleans()) else decimal_bytes(n, draw(st.integers(0, 3)))
    rec["value"] = raw
    stripped: Any = fastavro.parse_schema(without_logical(writer))
    for f in stripped["fields"]:
        if f["name"] not in rec:
            rec[f["name"]] = draw(value_of(f["type"]))
    out = io.BytesIO()
    fastavro.schemaless_writer(out, stripped, shaped(rec, stripped))
    return out.getvalue()


@FUZZ
@given(st.data(), st.lists(writer_schemas(), min_size=1, max_size=3))
def test_random_writer_schemas_match_the_reference(data: st.DataObject, writers: list[Any]) -> None:
    schemas = {100 + k: w for k, w in enumerate(writers)}
    programs = programs_for(schemas)
    assert set(programs) == set(schemas)  # every generated layout is one the fast path reads
    values = [
        frame_confluent(sid, data.draw(bodies(schemas[sid])))
        for sid in data.draw(st.lists(st.sampled_from(sorted(schemas)), min_size=1, max_size=8))
    ]
    batch, wants = check(values, schemas, programs)
    assert [bool(s) for s in batch.slow] == [not ordinary(w) for w in wants]


# --- compile_program refuses what it cannot read exactly -----------------------------------


def variant(schema: Any, edit: Callable[[list[dict[str, Any]]], None]) -> Any:
    raw = without_logical_keep(schema)
    edit(raw["fields"])
    return fastavro.parse_schema(raw)


def without_logical_keep(schema: Any) -> Any:
    """A re-parsable copy (fastavro's bookkeeping keys removed, logical types kept)."""
    if isinstance(schema, dict):
        return {k: without_logical_keep(v) for k, v in schema.items() if not k.startswith("__")}
    if isinstance(schema, list):
        return [without_logical_keep(v) for v in schema]
    return schema


def _drop(name: str) -> Callable[[list[dict[str, Any]]], None]:
    return lambda fs: fs.remove(next(f for f in fs if f["name"] == name))


def _retype(name: str, new: Any, **more: Any) -> Callable[[list[dict[str, Any]]], None]:
    def edit(fs: list[dict[str, Any]]) -> None:
        field = next(f for f in fs if f["name"] == name)
        field["type"] = new
        field.update(more)

    return edit


DECIMAL_39 = {"type": "bytes", "logicalType": "decimal", "precision": 39, "scale": 9}
DECIMAL_S8 = {"type": "bytes", "logicalType": "decimal", "precision": 38, "scale": 8}
REFUSED = {
    "missing event_id": _drop("event_id"),
    "missing value": _drop("value"),
    "missing timestamp": _drop("timestamp"),
    "precision 39": _retype("value", DECIMAL_39),
    "scale 8": _retype("value", DECIMAL_S8),
    "fixed decimal": _retype(
        "value",
        {
            "type": "fixed",
            "name": "D",
            "size": 16,
            "logicalType": "decimal",
            "precision": 38,
            "scale": 9,
        },
    ),
    "plain long timestamp": _retype("timestamp", "long"),
    "timestamp-micros": _retype("timestamp", {"type": "long", "logicalType": "timestamp-micros"}),
    "int event_name": _retype("event_name", "int"),
    "bytes event_id (a promotion)": _retype("event_id", "bytes"),
    "optional cancels": _retype("cancels", ["null", "string"]),
    "map of long": _retype("properties", {"type": "map", "values": "long"}),
    "int source": _retype("source", "int", default=0),
    "union extra field": lambda fs: fs.append({"name": "x", "type": ["null", "long"]}),
    "record extra field": lambda fs: fs.append(
        {"name": "x", "type": {"type": "record", "name": "R", "fields": []}}
    ),
}


@pytest.mark.parametrize("edit", REFUSED.values(), ids=REFUSED.keys())
def test_compile_refuses(edit: Callable[[list[dict[str, Any]]], None]) -> None:
    writer = variant(V4, edit)
    assert compile_program(writer, V4, plain_reader) is None


def test_compile_refuses_non_records_and_other_names() -> None:
    assert compile_program(fastavro.parse_schema("string"), V4, plain_reader) is None
    renamed = without_logical_keep(V4)
    renamed["name"] = "io.usageconsumer.Other"
    renamed = fastavro.parse_schema(renamed)
    assert compile_program(renamed, V4, plain_reader) is None
    rec = {**_base_rec(), "properties": {}, "source": "", "cancels": ""}
    _, wants = check([encode_confluent(rec, renamed, 5)], {5: renamed})
    assert wants == [None]  # fastavro refuses to resolve records of other names


def test_compile_refuses_other_readers() -> None:
    assert compile_program(V2, V2, plain_reader) is None  # the reader must be the v4 shape
    wider = variant(V4, _retype("value", DECIMAL_39))
    assert compile_program(V4, wider, plain_reader) is None


@pytest.mark.parametrize("edit", REFUSED.values(), ids=REFUSED.keys())
def test_refused_schemas_get_no_program(edit: Callable[[list[dict[str, Any]]], None]) -> None:
    """An id without a program: every row is slow, whatever its bytes."""
    values = [frame_confluent(9, b"\x02a\x02b\x02c\x02\x01\x02\x00\x00\x00")]
    batch, _ = check(values, {9: variant(V4, edit)})
    assert batch.slow.all()


def test_program_errors() -> None:
    v = encode_confluent({**_base_rec(), "properties": {}}, V2, 2)
    with pytest.raises(ValueError):
        decode_batch([v], {2: b"\xaf\x01\x01"})  # required ops missing
    with pytest.raises(ValueError):
        nine_deep = b"\x09" + b"\x0a" * 9 + b"\x00"  # arrays nest at most 8 deep
        decode_batch([v], {2: b"\xaf\x01\x01\x02\x03\x06\x07" + nine_deep})
    with pytest.raises(TypeError):
        decode_batch([v], {2: "program"})  # type: ignore[dict-item]


# --- hand-made encodings: oddities fastavro never writes -----------------------------------


def padded(n: int, extra: int) -> bytes:
    """A non-minimal varint: continuation bytes with no value."""
    z = bytearray(zz(n))
    z[-1] |= 0x80
    return bytes(z) + b"\x80" * (extra - 1) + b"\x00"


def s(b: bytes) -> bytes:
    return zz(len(b)) + b


def _base_rec() -> dict[str, Any]:
    return {
        "event_id": "evt-1",
        "event_name": "api_call",
        "customer_id": "cus_1",
        "value": Decimal("1.5"),
        "timestamp": 1_763_000_000_123,
    }


def v2_body(props: bytes = b"\x00", value: bytes = b"\x02\x03", ts: bytes | None = None) -> bytes:
    head = s(b"evt-1") + s(b"api_call") + s(b"cus_1") + value
    return frame_confluent(2, head + (zz(1_763_000_000_123) if ts is None else ts) + props)


def test_hand_encoding_matches_fastavro() -> None:
    rec = {**_base_rec(), "value": Decimal("0.000000003"), "properties": {}}
    assert v2_body() == encode_confluent(rec, V2, 2)


CRAFTED: dict[str, tuple[bytes, bool]] = {  # (message, fast?)
    "negative block, right size": (
        v2_body(props=zz(-1) + zz(len(s(b"k") + s(b"v"))) + s(b"k") + s(b"v") + b"\x00"),
        True,
    ),
    "negative block, wrong size": (
        v2_body(props=zz(-1) + zz(9) + s(b"k") + s(b"v") + b"\x00"),
        False,
    ),
    "two blocks": (
        v2_body(props=zz(1) + s(b"a") + s(b"1") + zz(1) + s(b"b") + s(b"2") + b"\0"),
        True,
    ),
    "repeated key across blocks": (
        v2_body(props=zz(1) + s(b"a") + s(b"1") + zz(1) + s(b"a") + s(b"2") + b"\0"),
        False,
    ),
    "repeated key": (
        v2_body(props=zz(2) + s(b"a") + s(b"1") + s(b"a") + s(b"2") + b"\0"),
        False,
    ),
    "repeated empty key": (
        v2_body(props=zz(2) + s(b"") + s(b"1") + s(b"") + s(b"2") + b"\0"),
        False,
    ),
    "65 entries": (
        v2_body(props=zz(65) + b"".join(s(b"k%d" % i) + s(b"") for i in range(65)) + b"\0"),
        False,
    ),
    "64 entries": (
        v2_body(props=zz(64) + b"".join(s(b"k%d" % i) + s(b"") for i in range(64)) + b"\0"),
        True,
    ),
    "padded varint": (v2_body(ts=padded(5, 2)), False),
    "11-byte varint": (v2_body(ts=b"\xff" * 10 + b"\x01"), False),
    "10-byte varint, top bits set": (v2_body(ts=b"\xff" * 9 + b"\x03"), False),
    "10-byte varint, min int64": (v2_body(ts=zz(INT64[0])), True),
    "10-byte varint, max int64": (v2_body(ts=zz(INT64[1])), True),
    "truncated varint": (v2_body(ts=b"\xff\xff", props=b""), False),
    "sign-padded decimal": (v2_body(value=s(b"\x00" * 20 + b"\x05")), True),
    "sign-padded negative decimal": (v2_body(value=s(b"\xff" * 20 + b"\x85")), True),
    "empty decimal": (v2_body(value=s(b"")), False),
    "17-byte decimal": (v2_body(value=s(b"\x01" + b"\x00" * 16)), False),
    "decimal 10**38 - 1": (v2_body(value=s(decimal_bytes(LIMIT - 1))), True),
    "decimal 10**38": (v2_body(value=s(decimal_bytes(LIMIT))), False),
    "decimal -(10**38 - 1)": (v2_body(value=s(decimal_bytes(1 - LIMIT))), True),
    "decimal -(10**38)": (v2_body(value=s(decimal_bytes(-LIMIT))), False),
    "decimal -(2**127)": (v2_body(value=s(decimal_bytes(-(2**127)))), False),
    "negative length": (frame_confluent(2, zz(-1) + b"x"), False),
    "length past the end": (frame_confluent(2, zz(50) + b"evt"), False),
    "trailing byte": (v2_body() + b"\x00", False),
    "surrogate in a key": (v2_body(props=zz(1) + s(b"\xed\xa0\x80") + s(b"v") + b"\0"), False),
    "overlong in a value": (v2_body(props=zz(1) + s(b"k") + s(b"\xc0\xaf") + b"\0"), False),
    "above U+10FFFF": (v2_body(props=zz(1) + s(b"k") + s(b"\xf4\x90\x80\x80") + b"\0"), False),
    "U+10FFFF": (v2_body(props=zz(1) + s(b"k") + s(b"\xf4\x8f\xbf\xbf") + b"\0"), True),
    "NUL in a value": (v2_body(props=zz(1) + s(b"k") + s(b"\x00") + b"\0"), True),
}


@pytest.mark.parametrize("case", CRAFTED.values(), ids=CRAFTED.keys())
def test_crafted(case: tuple[bytes, bool]) -> None:
    message, fast = case
    batch, _ = check([message], VERSIONS)
    assert bool(batch.slow[0]) != fast


def test_zero_length_decimal_is_slow_and_refused() -> None:
    """A decimal of zero bytes is no number (Java Avro refuses it): the C side leaves the row
    to the reference, which dead-letters it, instead of reading it as 0."""
    message = v2_body(value=s(b""))
    batch = decode_batch([message, v2_body()], programs_for(VERSIONS))
    assert batch.slow.tolist() == [True, False]
    _, wants = check([message], VERSIONS)
    assert wants == [None]


EXTRA = {"type": "record", "name": "UsageEvent", "namespace": "io.usageconsumer"}


def with_extra(extra_type: Any) -> Any:
    """v1 with one extra field first, so every skipped value is followed by real fields."""
    fields = [{"name": "x", "type": extra_type}, *without_logical_keep(V1)["fields"]]
    return fastavro.parse_schema({**EXTRA, "fields": fields})


V1_TAIL = s(b"evt-1") + s(b"api_call") + s(b"cus_1") + b"\x02\x03" + zz(7)
SKIPPED: dict[str, tuple[Any, bytes, bool]] = {  # (extra type, its bytes, fast?)
    "boolean 1": ("boolean", b"\x01", True),
    "boolean 2": ("boolean", b"\x02", False),
    "int at 32 bits": ("int", zz(-(2**31)), True),
    "int past 32 bits": ("int", zz(2**31), False),
    "enum in range": ({"type": "enum", "name": "E", "symbols": ["A", "B"]}, zz(1), True),
    "enum out of range": ({"type": "enum", "name": "E", "symbols": ["A", "B"]}, zz(2), False),
    "enum negative": ({"type": "enum", "name": "E", "symbols": ["A", "B"]}, zz(-1), False),
    "invalid UTF-8 string": ("string", s(b"\xff"), False),
    "valid UTF-8 string": ("string", s("\U0001f600".encode()), True),
    "bytes, any content": ("bytes", s(b"\xff\x00"), True),
    "fixed": ({"type": "fixed", "name": "F", "size": 3}, b"\xff\xff\xff", True),
    "array, negative block": (
        {"type": "array", "items": "long"},
        zz(-2) + zz(2) + zz(1) + zz(2) + b"\0",
        True,
    ),
    "array, negative block, wrong size": (
        {"type": "array", "items": "long"},
        zz(-2) + zz(3) + zz(1) + zz(2) + b"\0",
        False,
    ),
    "map with invalid key": ({"type": "map", "values": "null"}, zz(1) + s(b"\xc3") + b"\0", False),
    "map of null": ({"type": "map", "values": "null"}, zz(2) + s(b"a") + s(b"b") + b"\0", True),
    "array of 1000 nulls": ({"type": "array", "items": "null"}, zz(1000) + b"\0", True),
    "array of too many nulls": ({"type": "array", "items": "null"}, zz(70_000) + b"\0", False),
    "nested": (
        {"type": "array", "items": {"type": "map", "values": "double"}},
        zz(1) + zz(1) + s(b"k") + b"\0" * 8 + b"\0" + b"\0",
        True,
    ),
}


@pytest.mark.parametrize("case", SKIPPED.values(), ids=SKIPPED.keys())
def test_skipped_fields_are_checked(case: tuple[Any, bytes, bool]) -> None:
    extra_type, encoded, fast = case
    writer = with_extra(extra_type)
    assert compile_program(writer, V4, plain_reader) is not None
    batch, _ = check([frame_confluent(7, encoded + V1_TAIL)], {7: writer})
    assert bool(batch.slow[0]) != fast


def test_utf8_exactly_as_python() -> None:
    """Every 1- and 2-byte string, and 3- and 4-byte ones over every lead and second byte."""
    tails = [b"\x80", b"\xbf", b"\x7f", b"\xc0"]
    cands = [bytes([a]) for a in range(256)]
    cands += [bytes([a, b]) for a in range(256) for b in range(256)]
    cands += [bytes([a, b]) + t for a in range(0xE0, 0xF0) for b in range(256) for t in tails]
    cands += [
        bytes([a, b]) + t + u
        for a in range(0xF0, 0xF8)
        for b in range(256)
        for t in tails[:3]
        for u in tails[:3]
    ]
    head, tail = s(b"evt-1"), s(b"cus_1") + b"\x02\x03" + zz(7)
    values = [frame_confluent(1, head + s(c) + tail) for c in cands]
    batch = decode_batch(values, programs_for(VERSIONS))
    names, slow = batch.event_name.to_pylist(), batch.slow.tolist()
    for i, c in enumerate(cands):
        try:
            text: str | None = c.decode()
        except UnicodeDecodeError:
            text = None
        assert slow[i] == (text is None), c
        assert names[i] == (text or "")


# --- corruption ----------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn, message: bytes) -> bytes | None:
    data = bytearray(message)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "set", "append", "insert", "delete"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xED, 0xF4]))
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=4))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 4))]
    return bytes(data)


@FUZZ
@given(st.data(), st.lists(st.tuples(events(), st.sampled_from([1, 2, 3, 4])), max_size=8))
def test_corrupted_messages(data: st.DataObject, rows: list[tuple[dict[str, Any], int]]) -> None:
    values: list[bytes | None] = []
    for rec, sid in rows:
        good = encode_confluent(shaped(rec, VERSIONS[sid]), VERSIONS[sid], sid)
        choice = data.draw(st.sampled_from(["good", "mutated", "mutated", "none", "empty"]))
        values.append(
            {"good": good, "none": None, "empty": b""}.get(choice) or data.draw(mutated(good))
        )
    check(values, VERSIONS)


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.builds(
                lambda sid, b: frame_confluent(sid, b),
                st.sampled_from([1, 2, 3, 4, 5]),
                st.binary(max_size=60),
            ),
            st.none(),
        ),
        max_size=10,
    )
)
def test_random_bytes(values: list[bytes | None]) -> None:
    check(values, VERSIONS)


def test_mixed_batch_keeps_rows_aligned() -> None:
    good = [
        encode_confluent(
            {**_base_rec(), "event_id": f"evt-{i}", "properties": {"k": str(i)}}, V2, 2
        )
        for i in range(50)
    ]
    values: list[bytes | None] = []
    for i, g in enumerate(good):
        values += [g, None, g[:-1], b"", frame_confluent(77, g[5:]), g + b"\0"][: 1 + i % 6]
    batch, _ = check(values, VERSIONS)
    fast = [i for i in range(len(values)) if not batch.slow[i]]
    assert [batch.event_id[i].as_py() for i in fast] == [f"evt-{i}" for i in range(50)]
    assert [dict(batch.properties[i].as_py())["k"] for i in fast] == [str(i) for i in range(50)]


# --- hashes and header ids -----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(), max_size=20))
def test_hash_matches_the_python_reference(values: list[str]) -> None:
    got = avrofast.hash_strings(values)
    assert got.dtype == np.uint64 and len(got) == len(values)
    assert [int(h) for h in got] == [id_hash_bytes(v.encode()) for v in values]


def _splitmix_finalizer(h: int) -> int:
    m = 2**64 - 1
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & m
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & m
    return h ^ (h >> 31)


@pytest.mark.parametrize(
    ("data", "fnv1a"),  # FNV-1a 64 test vectors
    [(b"", 0xCBF29CE484222325), (b"a", 0xAF63DC4C8601EC8C), (b"foobar", 0x85944171F73967E8)],
)
def test_hash_known_values(data: bytes, fnv1a: int) -> None:
    assert id_hash_bytes(data) == _splitmix_finalizer(fnv1a)
    assert int(avrofast.hash_strings([data.decode()])[0]) == _splitmix_finalizer(fnv1a)


def test_hash_strings_errors_and_spread() -> None:
    assert len(set(avrofast.hash_strings([f"evt-{i}" for i in range(10_000)]).tolist())) == 10_000
    with pytest.raises(TypeError):
        avrofast.hash_strings([b"bytes"])  # type: ignore[list-item]
    with pytest.raises(UnicodeEncodeError):
        avrofast.hash_strings(["\ud800"])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.none(),
            st.binary(max_size=8),
            st.builds(
                lambda m, i: bytes([m]) + i.to_bytes(4, "big"),
                st.sampled_from([0, 1]),
                st.integers(0, 2**32 - 1),
            ),
        ),
        max_size=20,
    )
)
def test_schema_ids_match_named_schema_ids(values: list[bytes | None]) -> None:
    reference = Decoder(mode="confluent", source=DictSource({}), reader=V4)
    assert avrofast.schema_ids(values) == reference.named_schema_ids(values)


# --- resources -----------------------------------------------------------------------------


def test_no_leaks() -> None:
    sample = generate(5000, 50, 4, 1_763_000_000_000)
    values = [m.value for m in sample.messages]
    programs = programs_for(VERSIONS)
    refs = [sys.getrefcount(values[0]), sys.getrefcount(programs[2])]
    for _ in range(20):
        decode_batch(values, programs)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(150):
        b = decode_batch(values, programs)
        avrofast.hash_strings(b.event_id[:100].to_pylist())
        avrofast.schema_ids(values)
    del b
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    assert grown_kb < 20_000  # a leak of the outputs would be ~150 MB
    assert [sys.getrefcount(values[0]), sys.getrefcount(programs[2])] == refs


class _Programs(Mapping[int, bytes]):
    """A Mapping that is not a dict: programs are looked up through .get."""

    def __init__(self, programs: dict[int, bytes]) -> None:
        self.programs = programs

    def __getitem__(self, key: int) -> bytes:
        return self.programs[key]

    def __len__(self) -> int:
        return len(self.programs)

    def __iter__(self) -> Iterator[int]:
        return iter(self.programs)


def test_any_mapping_of_programs() -> None:
    v = encode_confluent({**_base_rec(), "properties": {}}, V2, 2)
    batch = decode_batch((v, None, frame_confluent(8, v[5:])), _Programs(programs_for(VERSIONS)))
    assert batch.slow.tolist() == [False, True, True]


def test_outputs_are_plain_arrow_and_numpy() -> None:
    v = encode_confluent({**_base_rec(), "properties": {"k": "v"}}, V2, 2)
    batch = decode_batch([v, v], programs_for(VERSIONS))
    assert str(batch.value.type) == "decimal128(38, 9)"
    assert str(batch.properties.type) == "map<string, string>"
    assert batch.event_id.offset == 0 and batch.value.offset == 0
    batch.timestamp[0] = 5  # writable: the caller may splice reference rows in
    assert batch.timestamp.tolist() == [5, 1_763_000_000_123]
    batch.properties.validate(full=True)
    batch.event_id.validate(full=True)
