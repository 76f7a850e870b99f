"""The run-path fuzz's messages and what must become of each, from the generator's own record.

Valid events (every writer layout, odd but legal ids, repeated map keys, negative map blocks,
sign-padded decimals, Kafka keys that disagree with the event), byte-identical copies in the
same or another partition, late events, and bad messages of every kind the brief of #19
lists, plus random byte mutations of valid events. Every message is judged by the oracle
(tests/fuzz/model.py); a hand-made bad message the oracle would accept is a bug of the
generator and stops it. A mutation the oracle accepts becomes a valid event, unless what it
decodes to would make the expected outcome depend on timing (a cancel, a `last` meter, an id
already used, an event time outside the regular span): then another mutation is drawn.

Event times keep the outcome deterministic: regular events lie in the 20 minutes before the
record time, so none is ever late; late events are 3 hours old and placed only after an
original event of their meter in their partition that has no copy in another partition
(a copy read first would make that original a duplicate, which moves no watermark).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal

from tests.fuzz.model import (
    LATENESS_MS,
    MAX_VALUE,
    METERS,
    Event,
    Verdict,
    blob,
    decimal,
    frame,
    judge,
    text,
    zz,
)

SPAN_MS = 20 * 60_000
LATE_MS = 3 * 3_600_000
BIG_BYTES = 900_000
BLANKS = [b" ", b"\t\n", "\u3000".encode()]  # str.strip() leaves nothing
Coord = tuple[int, int]  # (partition, offset)
HourKey = tuple[str, str, int]  # (customer, meter, hour start in epoch seconds)


@dataclass
class Message:
    partition: int
    key: bytes | None
    value: bytes | None
    what: str  # the generator's label: valid, copy, late, or the kind of bad message
    verdict: Verdict
    offset: int = -1  # set from the delivery report


@dataclass
class Expected:
    """What the consumer must end with, by coordinates and by totals."""

    dead: set[Coord] = field(default_factory=set)
    late: set[Coord] = field(default_factory=set)
    accepted: dict[tuple[str, str], Event] = field(default_factory=dict)  # (meter, id)
    copies: int = 0

    def hourly(self) -> dict[HourKey, Decimal]:
        """ClickHouse's usage_hourly: sums, and the last value by (event time, id)."""
        out: dict[HourKey, Decimal] = {}
        newest: dict[HourKey, tuple[int, str]] = {}
        for e in self.accepted.values():
            key = (e.customer_id, e.meter, e.timestamp_ms // 3_600_000 * 3600)
            if METERS[e.event_name][1] == "sum":
                out[key] = out.get(key, Decimal(0)) + e.value
            elif (e.timestamp_ms, e.event_id) > newest.get(key, (-(2**63), "")):
                newest[key], out[key] = (e.timestamp_ms, e.event_id), e.value
        return out

    def stripe(self) -> dict[tuple[str, str], Decimal]:
        """What Stripe holds per (customer, meter) once drained: the whole part of each sum
        (fractions carry and never reach a whole unit), and the newest `last` value."""
        sums: dict[tuple[str, str], Decimal] = {}
        newest: dict[tuple[str, str], tuple[int, Decimal]] = {}
        for e in self.accepted.values():
            key = (e.customer_id, e.meter)
            if METERS[e.event_name][1] == "sum":
                sums[key] = sums.get(key, Decimal(0)) + e.value
            elif e.timestamp_ms > newest.get(key, (-(2**63), Decimal(0)))[0]:
                newest[key] = (e.timestamp_ms, e.value)
        out = {k: v.to_integral_value(ROUND_FLOOR) for k, v in sums.items()}
        out |= {k: v for k, (_, v) in newest.items()}
        return {k: v for k, v in out.items() if v}


def expect(messages: list[Message]) -> Expected:
    """The outcome, message by message in each partition's order: dead letters, then by
    (meter, event id) the first copy wins, then an event more than the allowed lateness
    behind its partition's and meter's newest accepted event time is late."""
    out = Expected()
    marks: dict[tuple[int, str], int] = {}
    where: dict[tuple[str, str], int] = {}  # (meter, id) -> the partition of its first copy
    for m in messages:
        coord = (m.partition, m.offset)
        e = m.verdict.event
        if e is None:
            out.dead.add(coord)
            continue
        assert not e.cancels, "the generator makes no cancels"
        key = (e.meter, e.event_id)
        if key in out.accepted:
            # a copy read first from another partition may win there: only the generator's
            # byte-identical copies go to another partition
            first = where[key]
            assert first == m.partition or out.accepted[key] == e, (
                f"{key} differs across partitions"
            )
            out.copies += 1
            continue
        mark = marks.get((m.partition, e.meter))
        if mark is not None and e.timestamp_ms < mark - LATENESS_MS:
            out.late.add(coord)
            continue
        out.accepted[key], where[key] = e, m.partition
        marks[(m.partition, e.meter)] = max(mark or e.timestamp_ms, e.timestamp_ms)
    return out


class Generator:
    """Seeded messages for `partitions` partitions, record time `now_ms`."""

    def __init__(self, seed: int, partitions: int, now_ms: int, customers: int = 30) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.partitions = partitions
        self.now = now_ms
        self.customers = [f"cus_fz_{i:03d}" for i in range(customers)]
        self.n = 0
        self.used: set[str] = set()  # ids of every valid event made, mutants' included
        self.pairs: set[tuple[str, str]] = set()  # (meter, id) of the generated valid events
        self.originals: list[Message] = []  # regular valid events, for copies
        # (partition, meter) -> its first original, the anchor of its late events: never
        # copied into another partition, so it is accepted there whatever the order in which
        # partitions are read, and its event time is that partition's mark for the meter
        self.anchors: dict[tuple[int, str], Message] = {}
        self.storage_s: dict[str, int] = {}  # per customer: seconds used by storage_gb
        self.counts: Counter[str] = Counter()

    # -- valid events ------------------------------------------------------------------

    def _id(self) -> str:
        """A fresh id, now and then odd but valid; never one a mutation already made."""
        while True:
            self.n += 1
            plain = f"fz-{self.seed}-{self.n:07d}"
            odd = [
                f"{plain} with spaces",
                f"{plain}-\u00e9\u3000\U0001f600",
                "\u00e9" + plain,  # not ASCII first: the reference decodes it
                (plain + "-" + "x" * 200)[:200],  # exactly the longest allowed
                f" {plain}",  # leading blank, not blank
                f"{plain}\x00nul",
            ]
            got = plain if self.rng.random() < 0.9 else self.rng.choice(odd)
            if got not in self.used:
                return got

    def _customer(self) -> str:
        if self.rng.random() < 0.97:
            return self.rng.choice(self.customers)
        odd = ["cus_\u00fcn\u00efc\u00f8d\u00e9", "cus fz spaced", "c" * 200, "cus_o'brien",
               'cus_"q"', "cus_back\\slash", "cus_\u2028\xa0", "cus_nul\x00"]  # fmt: skip
        return self.rng.choice(odd)

    def _value(self, name: str) -> Decimal:
        r = self.rng.random()
        if name == "storage_gb":
            return Decimal(self.rng.randint(0, 500_000_000)) / 1000
        if r < 0.6:
            return Decimal(self.rng.randint(1, 10 if name == "api_call" else 5000))
        if r < 0.8:
            return Decimal(self.rng.randint(0, 10**12)).scaleb(-9)  # fractions
        if r < 0.9:
            return Decimal(self.rng.randint(10**13, 10**15))  # 14-16 digits
        return self.rng.choice([Decimal(0), MAX_VALUE, MAX_VALUE - Decimal("1e-9")])

    def _time(self, name: str, customer: str) -> int:
        if name != "storage_gb":
            return self.now - self.rng.randint(0, SPAN_MS)
        # `last` meters: one event a second per customer, so Stripe's seconds never tie
        s = self.storage_s[customer] = self.storage_s.get(customer, 0) + 1
        assert s * 1000 < SPAN_MS, "too many storage_gb events for one customer"
        return self.now - s * 1000 - self.rng.randint(0, 999)

    def _props(self) -> bytes:
        r = self.rng
        values = ["eu", "us", "", "\u00e9", "o'k", '"q"', "\\", "\x00"]
        pairs = [(f"k{r.randint(0, 3)}", r.choice(values)) for _ in range(3)]
        pairs = pairs[: r.randint(0, 3)]  # repeated keys are legal: the last one wins
        if r.random() < 0.02:  # more entries than the fast path takes, and long keys
            pairs = [(f"k{i}-" + "k" * r.choice([0, 300]), "v") for i in range(r.randint(60, 90))]
        if not pairs:
            return b"\x00"
        body = b"".join(text(k) + text(v) for k, v in pairs)
        if r.random() < 0.3:  # a negative count carries the block's size
            return zz(-len(pairs)) + zz(len(body)) + body + b"\x00"
        return zz(len(pairs)) + body + b"\x00"

    def _long(self, n: int) -> bytes:
        """A varint, now and then padded with redundant bytes (legal up to 10 in all)."""
        z = bytearray(zz(n))
        pad = self.rng.choice([0] * 19 + [10 - len(z)])
        if pad <= 0:
            return bytes(z)
        z[-1] |= 0x80
        return bytes(z) + b"\x80" * (pad - 1) + b"\x00"

    def encode(
        self,
        layout: int,
        fields: tuple[bytes, bytes, bytes, bytes, int],
        props: bytes | None = None,
        source: bytes | None = None,
        cancels: bytes = b"\x00",
    ) -> bytes:
        """A message in `layout` (model.LAYOUTS) from (event id, name, customer, raw decimal
        encoding, time) and raw encodings of the later fields."""
        event_id, name, customer, value, ts = fields
        head = blob(event_id) + blob(name) + blob(customer)
        props = self._props() if props is None else props
        if layout == 21:
            return frame(21, head + zz(self.rng.randint(0, 9)) + value + self._long(ts) + props)
        body = head + value + self._long(ts)
        if layout >= 2:
            body += props
        if layout >= 3:
            body += text(self.rng.choice(["", "api-gw", "\u00e9"])) if source is None else source
        if layout >= 4:
            body += cancels
        return frame(layout, body)

    def valid(
        self,
        name: str | None = None,
        ts: int | None = None,
        event_id: str | None = None,
        what: str = "valid",
    ) -> Message:
        r = self.rng
        if name is None:
            name = r.choices(list(METERS), [0.55, 0.3, 0.15])[0]
        if event_id is None:
            event_id = self._id() if r.random() < 0.97 else self._id_of_another_meter(name)
        customer = self._customer()
        value = self._value(name)
        ts = self._time(name, customer) if ts is None else ts
        unscaled = int(value.scaleb(9))
        raw = decimal(unscaled, r.choice([0, 0, 0, 1, 3]))
        layout = r.choice([1, 2, 3, 4, 21])
        body = self.encode(layout, (event_id.encode(), name.encode(), customer.encode(), raw, ts))
        self.used.add(event_id)
        self.pairs.add((METERS[name][0], event_id))
        return self._message(body, what, self._key(name, event_id))

    def _id_of_another_meter(self, name: str) -> str:
        """An id an original of another meter has: (meter, id) is the event, so this one
        is an event of its own."""
        meter = METERS[name][0]
        for _ in range(5):
            other = self.rng.choice(self.originals).verdict.event if self.originals else None
            if other is not None and (meter, other.event_id) not in self.pairs:
                return other.event_id
        return self._id()

    def _key(self, name: str, event_id: str) -> bytes | None:
        r = self.rng.random()
        if r < 0.7:
            return f"{name}/{event_id}".encode()
        if r < 0.8:
            return None
        if r < 0.9:  # names another event
            return f"tokens/fz-other-{self.rng.randrange(10**6)}".encode()
        return self.rng.randbytes(self.rng.randint(0, 40))

    def _message(self, value: bytes | None, what: str, key: bytes | None = None) -> Message:
        p = self.rng.randrange(self.partitions)
        return Message(p, key, value, what, judge(value, self.now))

    # -- bad messages ------------------------------------------------------------------

    def _fields(
        self,
        layout: int = 2,
        event_id: bytes | None = None,
        name: bytes = b"api_call",
        customer: bytes | None = None,
        value: bytes | None = None,
        ts: int | None = None,
        **later: bytes,
    ) -> bytes:
        """A fresh api_call event in `layout` with the fields given replaced by these raw
        encodings (`later`: props, source, cancels)."""
        r = self.rng
        fields = (
            self._id().encode() if event_id is None else event_id,
            name,
            r.choice(self.customers).encode() if customer is None else customer,
            decimal(r.randint(1, 10) * 10**9) if value is None else value,
            self.now - r.randint(0, SPAN_MS) if ts is None else ts,
        )
        return self.encode(layout, fields, **later)

    def _good_bytes(self) -> bytes:
        return self._fields()

    def bad(self) -> Message:
        """One bad message of a kind drawn at random; the oracle must refuse it."""
        while True:
            kind, make = self.rng.choice(list(self._bad_kinds().items()))
            value = make()
            msg = self._message(value, kind, self._key("api_call", "fz-bad"))
            if msg.verdict.event is not None:
                raise AssertionError(f"generator: the oracle accepts a {kind} message: {value!r}")
            if not msg.verdict.beyond:  # random bytes can be anything
                return msg

    def _bad_kinds(self) -> dict[str, Callable[[], bytes | None]]:
        r, now = self.rng, self.now
        bad_utf8 = [b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\xc3"]

        def truncated() -> bytes:
            good = self._good_bytes()
            return good[: r.randint(5, len(good) - 1)]

        def unknown_id() -> bytes:
            return frame(r.choice([0, 5, 99, 2**32 - 1]), self._good_bytes()[5:])

        def non_utf8() -> bytes:
            junk = b"fz" + r.choice(bad_utf8)
            where = r.choice(["event_id", "name", "customer", "key", "item", "source"])
            if where in ("event_id", "name", "customer"):
                return self._fields(**{where: junk})  # type: ignore[arg-type]
            if where == "source":
                return self._fields(layout=3, source=blob(junk))
            pair = (blob(junk) + text("v")) if where == "key" else (text("k") + blob(junk))
            return self._fields(props=zz(1) + pair + b"\x00")

        return {
            "truncated body": truncated,
            "truncated header": lambda: b"\x00" + r.randbytes(r.randint(0, 3)),
            "empty": lambda: b"",
            "tombstone": lambda: None,
            "wrong magic byte": lambda: bytes([r.randint(1, 255)]) + self._good_bytes()[1:],
            "unknown schema id": unknown_id,
            "other decimal scale": lambda: frame(20, self._good_bytes()[5:]),
            "more decimal digits": lambda: frame(22, self._good_bytes()[5:]),
            "huge decimal": lambda: self._fields(
                value=decimal(r.choice([1, -1]) * r.choice([10**38, 2**127 - 1, 10**45]))
            ),
            "negative decimal": lambda: self._fields(value=decimal(-r.randint(1, 10**20))),
            "zero-length decimal": lambda: self._fields(value=blob(b"")),
            "value above the maximum": lambda: self._fields(
                value=decimal(int(MAX_VALUE.scaleb(9)) + r.choice([1, 10**9, 10**20]))
            ),
            "timestamp 0": lambda: self._fields(ts=0),
            "negative timestamp": lambda: self._fields(ts=-r.randint(1, 2**63)),
            "timestamp year 9999": lambda: self._fields(ts=253_402_300_799_999),
            "timestamp far future": lambda: self._fields(ts=r.choice([2**62, 2**63 - 1])),
            "timestamp just ahead": lambda: self._fields(ts=now + 300_001),
            "timestamp 35 days old": lambda: self._fields(ts=now - 35 * 86_400_000 - 1),
            "empty event id": lambda: self._fields(event_id=b""),
            "blank event id": lambda: self._fields(event_id=r.choice(BLANKS)),
            "empty customer id": lambda: self._fields(customer=b""),
            "10,000-character id": lambda: self._fields(event_id=b"e" * 10_000),
            "201-character customer": lambda: self._fields(customer=b"c" * 201),
            "non-UTF-8 string": non_utf8,
            "unknown meter": lambda: self._fields(name=r.choice([b"legacy", b"", b"API_CALL"])),
            "trailing bytes": lambda: self._good_bytes() + r.randbytes(r.randint(1, 4)),
            "cancels itself": lambda: self._fields(4, b"fz-self", cancels=text("fz-self")),
            "random bytes": lambda: r.randbytes(r.randint(1, 60)),
        }  # fmt: skip

    # -- mutations ---------------------------------------------------------------------

    def mutant(self) -> Message:
        """A valid sum-meter event with bytes flipped, inserted or removed, judged by the
        oracle; drawn again while what it decodes to would make the outcome timing-bound, or
        while it holds an encoding the two readers differ on (model._Beyond)."""
        r = self.rng
        for _ in range(50):
            good = self.valid(r.choice(["api_call", "tokens"])).value
            assert good is not None
            b = bytearray(good)
            for _ in range(r.randint(1, 3)):
                at = r.randrange(len(b))
                kind = r.randrange(4)
                if kind == 0:
                    b[at] ^= 1 << r.randrange(8)
                elif kind == 1:
                    b[at] = r.choice([0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xED])
                elif kind == 2:
                    b[at:at] = r.randbytes(r.randint(1, 3))
                elif len(b) > 6:
                    del b[at : at + r.randint(1, 3)]
            msg = self._message(bytes(b), "mutated", self._key("api_call", "fz-mutant"))
            e = msg.verdict.event
            if msg.verdict.beyond:
                continue
            if e is None:
                return msg
            timing_bound = (
                e.cancels
                or e.event_name == "storage_gb"
                or e.event_id in self.used
                or not self.now - SPAN_MS - 5 * 60_000 <= e.timestamp_ms <= self.now + 300_000
            )
            if not timing_bound:
                self.used.add(e.event_id)
                return msg
        raise AssertionError("no usable mutation in 50 draws")

    # -- the plan ----------------------------------------------------------------------

    def messages(self, n: int) -> list[Message]:
        """`n` messages: about 55% valid, 5% copies, 2% late, 38% bad (half of them random
        mutations), and two of about 900 KB (one valid, one with a 900 KB id)."""
        out: list[Message] = []
        big_at = self.rng.sample(range(n), min(2, n))
        for i in range(n):
            if i in big_at:
                out.append(self.big(valid=i == big_at[0]))
                continue
            x = self.rng.random()
            if x < 0.55 or not self.originals:
                msg = self.valid()
                msg.what = "valid"
                self.originals.append(msg)
                e = msg.verdict.event
                assert e is not None, f"generator: the oracle refuses a valid event: {msg}"
                self.anchors.setdefault((msg.partition, e.meter), msg)
            elif x < 0.60:
                msg = self.copy()
            elif x < 0.62:
                msg = self.late()
            elif x < 0.81:
                msg = self.bad()
            else:
                msg = self.mutant()
            self.counts[msg.what] += 1
            out.append(msg)
        return out

    def copy(self) -> Message:
        """An earlier valid event again, byte for byte, in its partition or another; or, in
        its own partition, a conflicting copy: the same meter and id with another customer,
        value and time (the first by offset counts)."""
        src = self.rng.choice(self.originals)
        e = src.verdict.event
        assert e is not None
        if self.rng.random() < 0.25:
            msg = self.valid(e.event_name, event_id=e.event_id, what="conflicting copy")
            msg.partition = src.partition
            return msg
        p = src.partition if self.rng.random() < 0.6 else self.rng.randrange(self.partitions)
        if any(src is a for a in self.anchors.values()):
            p = src.partition
        return Message(p, src.key, src.value, "copy", src.verdict)

    def late(self) -> Message:
        """An event three hours old behind an original of its meter in its partition."""
        p, meter = self.rng.choice(sorted(self.anchors))
        name = next(k for k, (m, _) in METERS.items() if m == meter)
        msg = self.valid(name, ts=self.now - LATE_MS - self.rng.randint(0, 60_000))
        msg.partition, msg.what = p, "late"
        return msg

    def big(self, valid: bool) -> Message:
        """About 900 KB: a valid event with a 900 KB property, or a 900 KB event id."""
        if not valid:
            value = self._fields(event_id=b"x" * BIG_BYTES)
            return self._message(value, "900 KB id", None)
        event_id = self._id()
        props = zz(1) + text("blob") + text("p" * BIG_BYTES) + b"\x00"
        body = (
            text(event_id) + text("tokens") + text(self.customers[0])
            + decimal(7 * 10**9) + zz(self.now - 1000) + props
        )  # fmt: skip
        self.used.add(event_id)
        return self._message(frame(2, body), "900 KB valid", f"tokens/{event_id}".encode())
