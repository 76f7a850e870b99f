"""What flows through the stages: a Kafka message detached from the client, and a range's
messages as columns.

The hot path never builds a `Record` per message (about 3 us each, as much as the rest of
a message's processing): a range keeps the client's messages and reads its columns in one
pass; a `Record` is made only for the few messages that leave as side outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from confluent_kafka import Message

# The column types every stage writes and ClickHouse stores: Decimal(38, 9) values, and
# DateTime64(3, 'UTC') times as Arrow millisecond timestamps.
DECIMAL = pa.decimal128(38, 9)
TIME_MS = pa.timestamp("ms", tz="UTC")


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = field(default=())

    @property
    def position(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)


def to_record(msg: Message) -> Record:
    ts_type, ts = msg.timestamp()
    raw = cast(list[tuple[str, bytes | None]], msg.headers() or [])  # a list when consumed
    headers = tuple((str(k), _bytes(v)) for k, v in raw)
    return Record(
        str(msg.topic()),
        int(msg.partition() or 0),
        int(msg.offset() or 0),
        _optional_bytes(msg.key()),
        _optional_bytes(msg.value()),
        int(ts) if ts_type else 0,
        headers,
    )


def _bytes(v: str | bytes | None) -> bytes:
    return v.encode() if isinstance(v, str) else (v or b"")


def _optional_bytes(v: str | bytes | None) -> bytes | None:
    return None if v is None else _bytes(v)


@dataclass(frozen=True)
class RangeInput:
    """One partition's messages of a range, in offset order, as the columns classification
    reads; `record(i)` materialises message i for a side output."""

    topic: str
    partition: int
    values: list[bytes | None]
    offsets: npt.NDArray[np.int64]
    timestamps: npt.NDArray[np.int64]  # record (broker or producer) time, ms; 0 if none
    record: Callable[[int], Record]
    topic_id: str = ""  # the topic's incarnation ("" where incarnations are not told apart)

    def __len__(self) -> int:
        return len(self.values)

    @classmethod
    def of_messages(
        cls, topic: str, partition: int, msgs: Sequence[Message], topic_id: str = ""
    ) -> RangeInput:
        n = len(msgs)
        stamps = [m.timestamp() for m in msgs]
        return cls(
            topic,
            partition,
            [m.value() for m in msgs],
            np.fromiter((m.offset() or 0 for m in msgs), np.int64, n),
            np.fromiter((ts if kind else 0 for kind, ts in stamps), np.int64, n),
            lambda i: to_record(msgs[i]),
            topic_id,
        )

    @classmethod
    def of_records(cls, records: Sequence[Record]) -> RangeInput:
        """The same columns from detached records (tests, re-drives)."""
        first = records[0] if records else Record("", 0, 0, None, None, 0)
        n = len(records)
        return cls(
            first.topic,
            first.partition,
            [r.value for r in records],
            np.fromiter((r.offset for r in records), np.int64, n),
            np.fromiter((r.timestamp_ms for r in records), np.int64, n),
            lambda i: records[i],
        )
