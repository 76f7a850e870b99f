"""Decode and validate stage over a whole range: messages -> columns, one outcome a row.

The fast path (consumer/decode/fast.py, in C) decodes well-formed messages straight into Arrow
columns, with no Python object per message, and the checks of `validate` run as array
operations. Every message the fast path is unsure of, and every row the array checks
reject, goes through the reference decoder and `validate` (consumer/decode/reference.py,
consumer/decode/validate.py), which alone name reasons and details. The fast path therefore
changes speed, never outcomes; the tests hold both to the same results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from consumer import crash_points
from consumer.config import MeterConfig
from consumer.decode import fast as avrofast
from consumer.decode.event import DecodedEvent, DecodeError
from consumer.decode.keys import Keys, key_of, keys_of, meter_salt
from consumer.decode.reference import Decoder
from consumer.decode.validate import Invalid, Limits, validate
from consumer.records import DECIMAL, TIME_MS, RangeInput

USAGE, CANCEL, INVALID = 0, 1, 2
VER_BASE = 1 << 62
_INT128_MAX = (1 << 127) - 1
# Record timestamps outside this span are checked one by one (no int64 overflow in sums).
_SANE_RECORD_MS = (0, 1 << 62)
PROPERTIES = pa.map_(pa.string(), pa.string())
# usage_events' columns as the ledger write sends them
LEDGER_SCHEMA = pa.schema(
    [
        ("meter", pa.string()),
        ("customer_id", pa.string()),
        ("event_id", pa.string()),
        ("event_time", TIME_MS),
        ("value", DECIMAL),
        ("properties", PROPERTIES),
        ("schema_id", pa.uint32()),
        ("topic", pa.string()),
        ("partition", pa.uint32()),
        ("offset", pa.uint64()),
        ("record_time", TIME_MS),
        ("ver", pa.uint64()),
        ("topic_id", pa.string()),  # the topic's incarnation (migration 25)
    ]
)


@dataclass(frozen=True)
class MeterTable:
    """The meters by position, as the arrays the vectorised checks index."""

    meters: list[MeterConfig]
    by_event: dict[str, int]  # event name -> position
    event_names: pa.Array
    names: pa.Array  # meter names, for the ledger's meter column
    max_hi: npt.NDArray[np.int64]  # floor(max_value * 10**9) as a 128-bit (hi, lo) pair
    max_lo: npt.NDArray[np.uint64]
    salts: npt.NDArray[np.uint64]
    lateness_ms: npt.NDArray[np.int64]

    @classmethod
    def of(cls, meters: Mapping[str, MeterConfig]) -> MeterTable:
        listed = list(meters.values())
        tops = [min(_unscaled_floor(m.max_value), _INT128_MAX) for m in listed]
        return cls(
            listed,
            {m.event_name: i for i, m in enumerate(listed)},
            pa.array([m.event_name for m in listed], pa.string()),
            pa.array([m.name for m in listed], pa.string()),
            np.array([t >> 64 for t in tops], np.int64),
            np.array([t & (2**64 - 1) for t in tops], np.uint64),
            np.array([meter_salt(m.name) for m in listed], np.uint64),
            np.array([m.allowed_lateness_seconds * 1000 for m in listed], np.int64),
        )


def _unscaled_floor(value: Decimal) -> int:
    """floor(value * 10**9): an unscaled decimal(38, 9) v exceeds `value` iff v exceeds it."""
    return int(value.scaleb(9).to_integral_value(ROUND_FLOOR))


@dataclass
class Events:
    """Every message of a range decoded and validated: `kind` USAGE | CANCEL | INVALID, and
    for valid rows the meter position, event time and dedup key."""

    inp: RangeInput
    meters: MeterTable
    fast: avrofast.FastBatch
    kind: npt.NDArray[np.int8]
    meter: npt.NDArray[np.int16]  # -1 where invalid
    ts: npt.NDArray[np.int64]
    key: Keys
    dead: dict[int, tuple[str, str]]  # row -> (reason, detail)
    slow: dict[int, DecodedEvent]  # valid rows the reference decoded
    schema_ids: list[int]  # the writer schema ids the messages' headers name, sorted

    def event(self, i: int) -> DecodedEvent:
        """Row i as the reference decoder returns it (for the few rows that leave as objects)."""
        got = self.slow.get(i)
        if got is not None:
            return got
        f = self.fast
        return DecodedEvent(
            str(f.event_id[i].as_py()),
            str(f.event_name[i].as_py()),
            str(f.customer_id[i].as_py()),
            f.value[i].as_py(),
            int(f.timestamp[i]),
            dict(f.properties[i].as_py() or []),
            int(f.schema_id[i]),
            str(f.cancels[i].as_py()),
        )

    def meter_of(self, i: int) -> MeterConfig:
        return self.meters.meters[int(self.meter[i])]

    def id_columns(self, rows: npt.NDArray[np.intp]) -> tuple[pa.Array, pa.Array]:
        """(meter name, event id) of the rows, in row order."""
        meter = self.meters.names.take(pa.array(self.meter[rows]))
        return meter, self._strings("event_id", rows)

    def ledger_table(self, rows: npt.NDArray[np.intp]) -> pa.Table:
        """The rows as usage_events columns (LEDGER_SCHEMA), in row order."""
        n = len(rows)
        record_ms = self.inp.timestamps[rows]
        meter, event_id = self.id_columns(rows)
        return pa.table(
            {
                "meter": meter,
                "customer_id": self._strings("customer_id", rows),
                "event_id": event_id,
                "event_time": pa.array(self.ts[rows], TIME_MS),
                "value": self._column("value", rows, lambda e: e.value, DECIMAL),
                "properties": self._column(
                    "properties", rows, lambda e: list(e.properties.items()), PROPERTIES
                ),
                "schema_id": pa.array(self._schema_ids(rows), pa.uint32()),
                "topic": pa.array([self.inp.topic] * n, pa.string()),
                "partition": pa.array(np.full(n, self.inp.partition, np.uint32)),
                "offset": pa.array(self.inp.offsets[rows].astype(np.uint64)),
                "record_time": pa.array(record_ms, TIME_MS),
                "ver": pa.array((VER_BASE - record_ms).astype(np.uint64)),
                "topic_id": pa.array([self.inp.topic_id] * n, pa.string()),
            },
            schema=LEDGER_SCHEMA,
        )

    def _schema_ids(self, rows: npt.NDArray[np.intp]) -> npt.NDArray[np.uint32]:
        ids = self.fast.schema_id[rows].copy()
        for j, i in enumerate(rows.tolist()):
            got = self.slow.get(i)
            if got is not None:
                ids[j] = got.schema_id
        return ids

    def _strings(self, name: str, rows: npt.NDArray[np.intp]) -> pa.Array:
        return self._column(name, rows, lambda e: getattr(e, name), pa.string())

    def _column(
        self,
        name: str,
        rows: npt.NDArray[np.intp],
        attr: Callable[[DecodedEvent], object],
        typ: pa.DataType,
    ) -> pa.Array:
        """The fast column taken at `rows`, with the reference-decoded rows spliced in."""
        taken = getattr(self.fast, name).take(pa.array(rows))
        if not self.slow:
            return taken
        at = [j for j, i in enumerate(rows.tolist()) if i in self.slow]
        if not at:
            return taken
        spliced = pa.array([attr(self.slow[int(rows[j])]) for j in at], typ)
        # positions 0..n-1 come from `taken`, n.. from `spliced`, in row order
        index = np.arange(len(rows))
        index[at] = len(rows) + np.arange(len(at))
        return pa.concat_arrays([taken.cast(typ), spliced]).take(pa.array(index))


class RangeDecoder:
    """Decodes and validates ranges for one meters configuration."""

    def __init__(self, decoder: Decoder, meters: Mapping[str, MeterConfig], limits: Limits):
        self.decoder = decoder
        self.meters = dict(meters)
        self.limits = limits
        self.table = MeterTable.of(self.meters)

    def decode(self, inp: RangeInput) -> Events:
        """Raises SchemaSourceUnavailable (transient) when a writer schema cannot be fetched."""
        values = inp.values
        crash_points.classifying(values)  # a crash test's hook; none in production
        named = avrofast.schema_ids(values)
        programs = self.decoder.programs(named)
        fast = avrofast.decode_batch(values, programs)
        n, t, lim = len(values), self.table, self.limits
        meter = _meter_positions(fast.event_name, t.event_names)
        words = np.frombuffer(fast.value.buffers()[1], np.int64, 2 * n, fast.value.offset * 16)
        hi, lo = words[1::2], words[0::2].view(np.uint64)
        at = np.maximum(meter, 0)
        too_large = (hi > t.max_hi[at]) | ((hi == t.max_hi[at]) & (lo > t.max_lo[at]))
        rts, ts = inp.timestamps, fast.timestamp
        # Rows the reference must decide: the fast path was unsure, or a record time so far
        # out that the sums below could overflow.
        odd = fast.slow | (rts < _SANE_RECORD_MS[0]) | (rts > _SANE_RECORD_MS[1])
        refused = (
            (meter < 0)
            | (hi < 0)
            | too_large
            | (ts > rts + lim.future_tolerance_ms)
            | (ts < rts - lim.max_past_ms)
        )
        cuts = np.frombuffer(fast.cancels.buffers()[1], np.int32, n + 1, fast.cancels.offset)
        is_cancel = np.diff(cuts) > 0
        for i in np.flatnonzero(is_cancel & ~odd & ~refused).tolist():
            refused[i] = fast.cancels[i].as_py() == fast.event_id[i].as_py()  # cancels itself
        kind = np.where(is_cancel, CANCEL, USAGE).astype(np.int8)
        ev = Events(
            inp,
            t,
            fast,
            kind,
            meter.astype(np.int16),
            ts.copy(),
            keys_of(fast.id_hash, t.salts[at]),
            {},
            {},
            named,
        )
        for i in np.flatnonzero(odd | refused).tolist():
            self._by_reference(ev, i, must_refuse=not odd[i])
        ev.key[ev.kind == INVALID] = 0
        return ev

    def _by_reference(self, ev: Events, i: int, must_refuse: bool) -> None:
        """A row the fast path left, or the array checks refused: the reference decides."""
        try:
            event = self.decoder.decode(ev.inp.values[i])
            meter = validate(event, int(ev.inp.timestamps[i]), self.meters, self.limits)
        except (DecodeError, Invalid) as exc:
            ev.kind[i], ev.meter[i] = INVALID, -1
            ev.dead[i] = (exc.reason, exc.detail)
            return
        if must_refuse:
            raise AssertionError(
                f"partition {ev.inp.partition} offset {int(ev.inp.offsets[i])}: the array "
                "checks refused an event the reference accepts"
            )
        m = self.table.by_event[meter.event_name]
        ev.slow[i] = event
        ev.kind[i] = CANCEL if event.cancels else USAGE
        ev.meter[i] = m
        ev.ts[i] = event.timestamp_ms
        ev.key[i] = key_of(int(self.table.salts[m]), event.event_id)


def _meter_positions(names: pa.Array, event_names: pa.Array) -> npt.NDArray[np.int64]:
    found = pc.index_in(names, value_set=event_names)
    return np.asarray(found.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
