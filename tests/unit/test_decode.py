"""Decode stage: every writer version round-trips exactly, every bad input is a DecodeError."""

from __future__ import annotations

import copy
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.decode.event import DecodedEvent, DecodeError
from consumer.decode.reference import Decoder
from consumer.decode.schemas import (
    SCHEMAS_DIR,
    LocalSchemaSource,
    SchemaSourceUnavailable,
    load_schema,
    reader_schema,
)
from consumer.decode.wire import encode_confluent, encode_event, frame_confluent

V1 = load_schema(SCHEMAS_DIR / "usage_event.v1.avsc")
V2 = load_schema(SCHEMAS_DIR / "usage_event.v2.avsc")
V3 = load_schema(SCHEMAS_DIR / "usage_event.v3.avsc")
V4 = reader_schema()
WRITERS = {1: V1, 2: V2, 3: V3, 4: V4}
FAR_FUTURE_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
BIG = Decimal("12345678901234567890.123456789")


def record(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "evt-1",
        "event_name": "api_call",
        "customer_id": "cus_123",
        "value": Decimal("1.5"),
        "timestamp": 1_763_000_000_123,
        "properties": {"region": "eu"},
    }
    base.update(overrides)
    return base


def for_writer(schema_id: int, rec: dict[str, Any]) -> dict[str, Any]:
    """Shape a record for the writer version: v1 has no properties, v3 adds source."""
    rec = dict(rec)
    if schema_id == 1:
        rec.pop("properties", None)
    if schema_id == 3:
        rec.setdefault("source", "billing-api")
    return rec


def confluent_decoder() -> Decoder:
    return Decoder(mode="confluent", source=LocalSchemaSource(), reader=V4)


def plain_decoder(writer: Any) -> Decoder:
    return Decoder(mode="plain", source=None, reader=V4, plain_writer=writer)


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    return confluent_decoder()


def expected(rec: dict[str, Any], schema_id: int, with_props: bool = True) -> DecodedEvent:
    return DecodedEvent(
        event_id=rec["event_id"],
        event_name=rec["event_name"],
        customer_id=rec["customer_id"],
        value=rec["value"],
        timestamp_ms=rec["timestamp"],
        properties=dict(rec["properties"]) if with_props else {},
        schema_id=schema_id,
    )


@pytest.mark.parametrize("schema_id", [1, 2, 3])
def test_confluent_round_trip_every_writer(decoder: Decoder, schema_id: int) -> None:
    rec = record()
    event = decoder.decode(
        encode_confluent(for_writer(schema_id, rec), WRITERS[schema_id], schema_id)
    )
    assert event == expected(rec, schema_id, with_props=schema_id != 1)
    assert schema_id in decoder.schema_ids_seen


@pytest.mark.parametrize("schema_id", [1, 2, 3])
def test_plain_round_trip_every_writer(schema_id: int) -> None:
    rec = record()
    event = plain_decoder(WRITERS[schema_id]).decode(
        encode_event(for_writer(schema_id, rec), WRITERS[schema_id])
    )
    assert event == expected(rec, 0, with_props=schema_id != 1)


def test_v1_properties_are_fresh_dicts(decoder: Decoder) -> None:
    """The reader default must not be shared: mutating one event cannot leak into another."""
    data = encode_confluent(for_writer(1, record()), V1, 1)
    first = decoder.decode(data)
    first.properties["leak"] = "x"
    assert decoder.decode(data).properties == {}


@pytest.mark.parametrize(
    "value",
    [
        Decimal("0.000000001"),
        BIG,
        -BIG,
        Decimal("99999999999999999999999999999.999999999"),
        Decimal(0),
        Decimal("-0.000000001"),
    ],
)
def test_decimals_are_exact(decoder: Decoder, value: Decimal) -> None:
    event = decoder.decode(encode_confluent(record(value=value), V2, 2))
    assert event.value == value
    assert event.value.as_tuple().exponent == -9


@pytest.mark.parametrize("ts", [0, 1, 1_763_000_000_123, FAR_FUTURE_MS, 2**62])
def test_timestamps_are_exact_ints(decoder: Decoder, ts: int) -> None:
    event = decoder.decode(encode_confluent(record(timestamp=ts), V2, 2))
    assert event.timestamp_ms == ts
    assert type(event.timestamp_ms) is int


def test_value_beyond_precision_is_wrong_type(decoder: Decoder) -> None:
    too_big = Decimal(10**29)  # 30 integer digits + 9 places = 39 > 38
    with pytest.raises(DecodeError) as err:
        decoder.decode(encode_confluent(record(value=too_big), V2, 2))
    assert err.value.reason == "wrong_type"


@pytest.mark.parametrize("data", [None, b""])
def test_empty(decoder: Decoder, data: bytes | None) -> None:
    with pytest.raises(DecodeError) as err:
        decoder.decode(data)
    assert err.value.reason == "empty"


def test_empty_plain() -> None:
    with pytest.raises(DecodeError) as err:
        plain_decoder(V2).decode(b"")
    assert err.value.reason == "empty"


def test_bad_magic(decoder: Decoder) -> None:
    with pytest.raises(DecodeError) as err:
        decoder.decode(b"\x01" + encode_confluent(record(), V2, 2)[1:])
    assert err.value.reason == "bad_magic"


@pytest.mark.parametrize("data", [b"\x00", b"\x00\x00\x00\x00"])
def test_truncated_header(decoder: Decoder, data: bytes) -> None:
    with pytest.raises(DecodeError) as err:
        decoder.decode(data)
    assert err.value.reason == "truncated_header"


def test_unknown_schema_id(decoder: Decoder) -> None:
    with pytest.raises(DecodeError) as err:
        decoder.decode(encode_confluent(record(), V2, 999))
    assert err.value.reason == "unknown_schema_id"
    assert 999 not in decoder.schema_ids_seen


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",  # runaway varint
        b"\x02",  # string claims 1 byte, none follow
        b"\x7f" + b"a" * 10,  # length prefix beyond the message
        b"\x02\xff" + b"\x00" * 20,  # invalid UTF-8
    ],
)
def test_garbage_avro(decoder: Decoder, body: bytes) -> None:
    with pytest.raises(DecodeError) as err:
        decoder.decode(frame_confluent(2, body))
    assert err.value.reason == "avro_decode_error"
    assert len(err.value.detail) < 300


@pytest.mark.parametrize("schema_id", [1, 2, 3, 4])
def test_zero_length_decimal_is_refused(decoder: Decoder, schema_id: int) -> None:
    """Java Avro refuses a decimal of zero bytes; reading it as 0 would hide a producer bug."""
    good = encode_confluent(for_writer(schema_id, record(value=Decimal(0))), WRITERS[schema_id], 0)
    good = frame_confluent(schema_id, good[5:])
    assert decoder.decode(good).value == 0
    at = 5 + len(b"\x0aevt-1\x10api_call\x0ecus_123")
    assert good[at : at + 2] == b"\x02\x00"  # a zero is one byte, 0x00
    with pytest.raises(DecodeError) as err:
        decoder.decode(good[:at] + b"\x00" + good[at + 2 :])
    assert err.value.reason == "avro_decode_error"
    assert "zero bytes" in err.value.detail


def test_trailing_bytes(decoder: Decoder) -> None:
    with pytest.raises(DecodeError) as err:
        decoder.decode(encode_confluent(record(), V2, 2) + b"\x00")
    assert err.value.reason == "trailing_bytes"


def test_trailing_bytes_plain() -> None:
    with pytest.raises(DecodeError) as err:
        plain_decoder(V2).decode(encode_event(record(), V2) + b"xx")
    assert err.value.reason == "trailing_bytes"


def _variant(path: Path, mutate: Any) -> Path:
    raw = json.loads((SCHEMAS_DIR / "usage_event.v2.avsc").read_text())
    mutate(raw["fields"])
    path.write_text(json.dumps(raw))
    return path


def _source_with(tmp_path: Path, schema: Path) -> LocalSchemaSource:
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"7": schema.name}))
    return LocalSchemaSource(tmp_path)


def test_writer_missing_required_field(tmp_path: Path) -> None:
    schema = _variant(tmp_path / "nocust.avsc", lambda fs: fs.pop(2))
    decoder = Decoder(mode="confluent", source=_source_with(tmp_path, schema), reader=V4)
    with pytest.raises(DecodeError) as err:
        decoder.decode(frame_confluent(7, b"\x00"))
    assert err.value.reason == "missing_field"


@pytest.mark.parametrize(
    "new_type",
    [
        {"type": "long", "logicalType": "timestamp-micros"},
        "string",
    ],
)
def test_writer_timestamp_wrong_type(tmp_path: Path, new_type: Any) -> None:
    def retype(fs: list[dict[str, Any]]) -> None:
        fs[4]["type"] = new_type

    schema = _variant(tmp_path / "ts.avsc", retype)
    decoder = Decoder(mode="confluent", source=_source_with(tmp_path, schema), reader=V4)
    for _ in range(2):  # the second failure comes from the cached verdict
        with pytest.raises(DecodeError) as err:
            decoder.decode(frame_confluent(7, b"\x00"))
        assert err.value.reason == "wrong_type"


@pytest.mark.parametrize(
    "value_type",
    [
        {"type": "bytes", "logicalType": "decimal", "precision": 38, "scale": 6},
        {"type": "bytes", "logicalType": "decimal", "precision": 39, "scale": 9},
        {"type": "bytes", "logicalType": "decimal", "scale": 9},
        "double",
    ],
)
def test_writer_decimal_mismatch(tmp_path: Path, value_type: Any) -> None:
    def rescale(fs: list[dict[str, Any]]) -> None:
        fs[3]["type"] = value_type

    schema = _variant(tmp_path / "scale.avsc", rescale)
    decoder = Decoder(mode="confluent", source=_source_with(tmp_path, schema), reader=V4)
    with pytest.raises(DecodeError) as err:
        decoder.decode(frame_confluent(7, b"\x00"))
    assert err.value.reason == "wrong_type"


def test_writer_string_field_wrong_type(tmp_path: Path) -> None:
    def retype(fs: list[dict[str, Any]]) -> None:
        fs[0]["type"] = "int"

    schema = _variant(tmp_path / "id.avsc", retype)
    writer = load_schema(schema)
    decoder = Decoder(mode="confluent", source=_source_with(tmp_path, schema), reader=V4)
    with pytest.raises(DecodeError) as err:
        decoder.decode(encode_confluent(record(event_id=5), writer, 7))
    assert err.value.reason == "wrong_type"


def test_plain_mode_rejects_incompatible_writer_at_start(tmp_path: Path) -> None:
    schema = _variant(tmp_path / "nocust.avsc", lambda fs: fs.pop(2))
    with pytest.raises(ValueError, match="customer_id"):
        plain_decoder(load_schema(schema))


def test_constructor_checks_mode_arguments() -> None:
    with pytest.raises(ValueError):
        Decoder(mode="confluent", source=None, reader=V4)
    with pytest.raises(ValueError):
        Decoder(mode="plain", source=None, reader=V4)


class _Down:
    def writer_schema(self, schema_id: int) -> Any:
        raise SchemaSourceUnavailable("registry down")


def test_unavailable_source_is_not_a_decode_error() -> None:
    decoder = Decoder(mode="confluent", source=_Down(), reader=V4)
    with pytest.raises(SchemaSourceUnavailable):
        decoder.decode(encode_confluent(record(), V2, 2))


class _Counting:
    def __init__(self) -> None:
        self.calls = 0

    def writer_schema(self, schema_id: int) -> Any:
        self.calls += 1
        return V2


def test_resolution_is_cached_per_schema_id() -> None:
    source = _Counting()
    decoder = Decoder(mode="confluent", source=source, reader=V4)
    data = encode_confluent(record(), V2, 2)
    for _ in range(3):
        decoder.decode(data)
    assert source.calls == 1


def test_reader_is_not_mutated() -> None:
    before = copy.deepcopy(V2)
    confluent_decoder().decode(encode_confluent(record(), V2, 2))
    assert before == V2


# --- properties ----------------------------------------------------------------------

_text = st.text(max_size=40)
_unscaled = st.integers(min_value=-(10**38) + 1, max_value=10**38 - 1)
records = st.fixed_dictionaries(
    {
        "event_id": _text,
        "event_name": _text,
        "customer_id": _text,
        "value": _unscaled.map(lambda u: Decimal(f"{u}E-9")),  # exact, no context rounding
        "timestamp": st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "properties": st.dictionaries(_text, _text, max_size=5),
    }
)


@settings(max_examples=300, deadline=None)
@given(rec=records, schema_id=st.sampled_from([1, 2, 3]))
def test_random_records_round_trip(rec: dict[str, Any], schema_id: int) -> None:
    decoder = _SHARED
    event = decoder.decode(
        encode_confluent(for_writer(schema_id, rec), WRITERS[schema_id], schema_id)
    )
    assert event == expected(rec, schema_id, with_props=schema_id != 1)


_REASONS = {
    "empty",
    "bad_magic",
    "truncated_header",
    "unknown_schema_id",
    "avro_decode_error",
    "trailing_bytes",
    "wrong_type",
}


def _reason_or_none(decoder: Decoder, payload: bytes) -> str | None:
    try:
        decoder.decode(payload)
    except DecodeError as exc:
        return exc.reason
    return None


@settings(max_examples=1000, deadline=None)
@given(data=st.binary(max_size=64), framed=st.booleans(), schema_id=st.sampled_from([1, 2, 3]))
def test_random_bytes_only_raise_decode_error(data: bytes, framed: bool, schema_id: int) -> None:
    payload = frame_confluent(schema_id, data) if framed else data
    assert _reason_or_none(_SHARED, payload) in {*_REASONS, None}
    assert _reason_or_none(_PLAIN, data) in {*_REASONS, None}


_SHARED = confluent_decoder()
_PLAIN = plain_decoder(V2)


def test_cancels_is_read_from_v4_and_empty_before() -> None:
    decoder = confluent_decoder()
    cancel = decoder.decode(encode_confluent(record(event_id="c-1", cancels="evt-1"), V4, 4))
    assert (cancel.event_id, cancel.cancels) == ("c-1", "evt-1")
    for schema_id, writer in WRITERS.items():
        event = decoder.decode(encode_confluent(for_writer(schema_id, record()), writer, schema_id))
        assert event.cancels == ""
