"""The run-path fuzz's oracle: what a message means, read from the Avro specification and the
documented rules, sharing no code with the consumer.

It encodes messages (`zz`, `text`, `decimal`) and judges any bytes (`judge`): a strict Avro
reader (the Java reader's limits: a varint of at most 10 bytes, no negative length, a
decimal of one byte or more, strict UTF-8, no trailing bytes) over the writer layouts the
fuzz registers, then the rules of docs/schema.md and docs/configuration.md's defaults (a
known event name, ids non-blank and at most 200 characters, a value in [0, 1e15], event
time within 5 minutes ahead and 35 days behind the record time).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

MAX_VALUE = Decimal("1e15")
FUTURE_MS = 300_000
PAST_MS = 35 * 86_400_000
LATENESS_MS = 3_600_000
LIMIT = 10**38
MAX_ID = 200
# event name -> (meter, aggregation): the consumer's default meters
METERS = {
    "api_call": ("api_calls", "sum"),
    "tokens": ("tokens", "sum"),
    "storage_gb": ("storage_gb", "last"),
}

_ID = ("event_id", "string")
_NAME = ("event_name", "string")
_CUSTOMER = ("customer_id", "string")
_VALUE = ("value", "decimal")
_TS = ("timestamp", "long")
_PROPS = ("properties", "map")
# schema id -> the writer's fields in order; None: registered, but no reader can take it
LAYOUTS: dict[int, tuple[tuple[str, str], ...] | None] = {
    1: (_ID, _NAME, _CUSTOMER, _VALUE, _TS),
    2: (_ID, _NAME, _CUSTOMER, _VALUE, _TS, _PROPS),
    3: (_ID, _NAME, _CUSTOMER, _VALUE, _TS, _PROPS, ("source", "string")),
    4: (_ID, _NAME, _CUSTOMER, _VALUE, _TS, _PROPS, ("source", "string"), ("cancels", "string")),
    # v2 with an extra int the reader skips
    21: (_ID, _NAME, _CUSTOMER, ("attempt", "int"), _VALUE, _TS, _PROPS),
    20: None,  # value decimal(38, 2): another scale
    22: None,  # value decimal(40, 9): more digits than the reader's 38
}


def zz(n: int) -> bytes:
    """Avro's zig-zag varint of a long."""
    u = ((n << 1) ^ (n >> 63)) & (2**64 - 1)
    out = bytearray()
    while True:
        b, u = u & 0x7F, u >> 7
        out.append(b | (0x80 if u else 0))
        if not u:
            return bytes(out)


def blob(b: bytes) -> bytes:
    return zz(len(b)) + b


def text(s: str) -> bytes:
    return blob(s.encode())


def decimal(unscaled: int, pad: int = 0) -> bytes:
    """Two's complement big endian, `pad` redundant sign bytes."""
    size = max(1, (unscaled.bit_length() + 8) // 8) + pad
    return blob(unscaled.to_bytes(size, "big", signed=True))


def frame(schema_id: int, body: bytes) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + body


@dataclass(frozen=True)
class Event:
    event_id: str
    event_name: str
    customer_id: str
    value: Decimal
    timestamp_ms: int
    cancels: str = ""

    @property
    def meter(self) -> str:
        return METERS[self.event_name][0]


@dataclass(frozen=True)
class Verdict:
    """`event` for a usage event or a cancel the rules accept, else `why` it is refused."""

    event: Event | None
    why: str = ""
    beyond: bool = False  # an encoding outside what both readers agree on (see _Beyond)


class _Refused(Exception):
    pass


class _Beyond(_Refused):
    """Encodings Java Avro refuses and the consumer's reference reader (fastavro) reads: a
    varint of more than 10 bytes, an int beyond 32 bits (docs/limits.md). Neither producer
    library writes them; the fuzz draws another mutation instead of judging one."""


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def long(self) -> int:
        u, shift = 0, 0
        for k in range(10):
            if self.pos >= len(self.data):
                raise _Refused("varint runs past the end")
            b = self.data[self.pos]
            self.pos += 1
            u |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                u &= 2**64 - 1
                return (u >> 1) ^ -(u & 1)
            if k == 9:
                break
        raise _Beyond("varint longer than 10 bytes")

    def raw(self) -> bytes:
        n = self.long()
        if n < 0 or n > len(self.data) - self.pos:
            raise _Refused("negative length" if n < 0 else "length past the end")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def string(self) -> str:
        try:
            return self.raw().decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused("not UTF-8") from None

    def map(self) -> dict[str, str]:
        out: dict[str, str] = {}
        while count := self.long():
            if count < 0:
                count = -count
                self.long()  # the block's size in bytes, for skipping
            for _ in range(count):
                key = self.string()
                out[key] = self.string()
        return out

    def decimal(self) -> Decimal:
        raw = self.raw()
        if not raw:
            raise _Refused("decimal of zero bytes")
        unscaled = int.from_bytes(raw, "big", signed=True)
        if not -LIMIT < unscaled < LIMIT:
            raise _Refused("decimal beyond 38 digits")
        return Decimal(unscaled).scaleb(-9)


def decode(data: bytes | None) -> dict[str, object]:
    """The fields of a framed message, or _Refused."""
    if not data:
        raise _Refused("empty")
    if data[0] != 0 or len(data) < 5:
        raise _Refused("not a Confluent frame")
    schema_id = int.from_bytes(data[1:5], "big")
    if schema_id not in LAYOUTS:
        raise _Refused("unknown schema id")
    layout = LAYOUTS[schema_id]
    if layout is None:
        raise _Refused("a writer schema the reader cannot take")
    r = _Reader(data, 5)
    fields: dict[str, object] = {}
    for name, kind in layout:
        if kind == "string":
            fields[name] = r.string()
        elif kind == "decimal":
            fields[name] = r.decimal()
        elif kind == "map":
            fields[name] = r.map()
        else:
            value = r.long()
            if kind == "int" and not -(2**31) <= value < 2**31:
                raise _Beyond("int out of range")
            fields[name] = value
    if r.pos != len(data):
        raise _Refused("trailing bytes")
    return fields


def _blank_or_long(s: str) -> bool:
    return not s.strip() or len(s) > MAX_ID


def judge(data: bytes | None, record_ms: int) -> Verdict:
    """What the consumer must make of a message produced with this record time."""
    try:
        f = decode(data)
    except _Refused as exc:
        return Verdict(None, str(exc), isinstance(exc, _Beyond))
    e = Event(
        str(f["event_id"]),
        str(f["event_name"]),
        str(f["customer_id"]),
        Decimal(str(f["value"])),
        int(str(f["timestamp"])),
        str(f.get("cancels", "")),
    )
    refusals = [
        (e.event_name not in METERS, "unknown event name"),
        (_blank_or_long(e.event_id), "event id blank or too long"),
        (_blank_or_long(e.customer_id), "customer id blank or too long"),
        (bool(e.cancels) and _blank_or_long(e.cancels), "cancels blank or too long"),
        (bool(e.cancels) and e.cancels == e.event_id, "cancels itself"),
        (e.value < 0, "negative value"),
        (e.value > MAX_VALUE, "value above the meter's maximum"),
        (e.timestamp_ms > record_ms + FUTURE_MS, "event time ahead of the record"),
        (e.timestamp_ms < record_ms - PAST_MS, "event time too far behind the record"),
    ]
    for refused, why in refusals:
        if refused:
            return Verdict(None, why)
    return Verdict(e)
