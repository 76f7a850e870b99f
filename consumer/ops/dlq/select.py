"""Which dead letters a `dlq` command works on: filters, and bounded reads of the table.

Every read is bounded by time (`record_time`, which the table is partitioned by month on)
and by the source topic; partition and reason narrow it further. A meter filter is a byte
search of the payloads within those bounds, confirmed by decoding each candidate.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from consumer.decode.event import DecodedEvent, DecodeError
from consumer.decode.schemas import SchemaSourceUnavailable
from consumer.ops.dlq.links import REDRIVE_OF
from consumer.ops.times import parse_instant
from consumer.store.backend import Backend

_AGO = re.compile(r"^(\d+)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# event name -> decoded event, or None where the payload does not decode
Decode = Callable[[bytes], DecodedEvent | None]


class DlqError(Exception):
    """An operator's mistake (a bad filter, an unknown dead letter): one line, exit 2."""


def parse_when(text: str, now_s: float) -> int:
    """A time as epoch ms: RFC 3339, epoch seconds, or an age (`90m`, `12h`, `7d`)."""
    m = _AGO.match(text.strip())
    if m:
        return int((now_s - int(m.group(1)) * _UNIT[m.group(2)]) * 1000)
    try:
        return int(parse_instant(text) * 1000)
    except ValueError as exc:
        raise DlqError(f"{exc}, or an age: 7d") from None


@dataclass(frozen=True)
class Filters:
    topic: str
    since_ms: int
    until_ms: int
    reasons: tuple[str, ...] = ()
    partitions: tuple[int, ...] = ()
    meters: tuple[str, ...] = ()  # event names (a configured meter's name is mapped to its)

    def __post_init__(self) -> None:
        if self.until_ms <= self.since_ms:
            raise DlqError("--until must be after --since")


@dataclass
class DeadLetterRow:
    topic: str
    partition: int
    offset: int
    reason: str
    detail: str
    record_time_ms: int
    written_at_ms: int
    key: bytes
    payload: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    event: DecodedEvent | None = None
    redrives: list[tuple[str, int, int, int]] = field(default_factory=list)  # id, state, p, o

    @property
    def which(self) -> str:
        return f"{self.partition}:{self.offset}"

    @property
    def redrive_of(self) -> str:
        """The dead letter this one is a re-driven copy of (topic/partition/offset), or ''."""
        return next((v.decode(errors="replace") for k, v in self.headers if k == REDRIVE_OF), "")


_COLUMNS = """topic, partition, offset, reason, detail, toUnixTimestamp64Milli(record_time),
    toUnixTimestamp64Milli(written_at), hex(key), hex(payload), header_keys,
    arrayMap(v -> hex(v), header_values)"""


def _where(f: Filters) -> tuple[str, dict[str, Any]]:
    sql = """topic = {t:String}
        AND record_time >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')
        AND record_time < fromUnixTimestamp64Milli({until:Int64}, 'UTC')
        AND ({np:UInt8} = 0 OR partition IN {p:Array(UInt32)})
        AND ({nr:UInt8} = 0 OR reason IN {r:Array(String)})
        AND ({nm:UInt8} = 0 OR multiSearchAny(payload, {m:Array(String)}))"""
    params = {
        "t": f.topic,
        "since": f.since_ms,
        "until": f.until_ms,
        "np": int(bool(f.partitions)),
        "p": list(f.partitions),
        "nr": int(bool(f.reasons)),
        "r": list(f.reasons),
        "nm": int(bool(f.meters)),
        "m": list(f.meters),
    }
    return sql, params


def _row(r: Sequence[Any]) -> DeadLetterRow:
    keys, values = r[9], r[10]
    return DeadLetterRow(
        str(r[0]),
        int(r[1]),
        int(r[2]),
        str(r[3]),
        str(r[4]),
        int(r[5]),
        int(r[6]),
        bytes.fromhex(str(r[7])),
        bytes.fromhex(str(r[8])),
        [(str(k), bytes.fromhex(str(v))) for k, v in zip(keys, values, strict=True)],
    )


def find(
    store: Backend, f: Filters, decode: Decode, limit: int | None
) -> tuple[list[DeadLetterRow], int]:
    """The matching dead letters, oldest first, at most `limit` (None: all), and how many
    matched in all. Each is decoded where it decodes."""
    where, params = _where(f)
    if not f.meters:
        (total,) = store.query(f"SELECT count() FROM dead_letters FINAL WHERE {where}", params)[0]
        cap = "" if limit is None else f"LIMIT {int(limit)}"
        rows = store.query(
            f"""SELECT {_COLUMNS} FROM dead_letters FINAL WHERE {where}
                ORDER BY record_time, partition, offset {cap}""",
            params,
        )
        out = [_row(r) for r in rows]
        for d in out:
            d.event = decode(d.payload)
        return out, int(total)
    # The byte search finds candidates; decoding says whose event name it really is.
    rows = store.query(
        f"""SELECT {_COLUMNS} FROM dead_letters FINAL WHERE {where}
            ORDER BY record_time, partition, offset""",
        params,
    )
    matched = []
    for r in rows:
        d = _row(r)
        d.event = decode(d.payload)
        if d.event is not None and d.event.event_name in f.meters:
            matched.append(d)
    return (matched if limit is None else matched[:limit]), len(matched)


def one(store: Backend, topic: str, partition: int, offset: int, decode: Decode) -> DeadLetterRow:
    """One dead letter by its coordinates (a keyed read)."""
    rows = store.query(
        f"""SELECT {_COLUMNS} FROM dead_letters FINAL
            WHERE topic = {{t:String}} AND partition = {{p:UInt32}} AND offset = {{o:UInt64}}""",
        {"t": topic, "p": partition, "o": offset},
    )
    if not rows:
        raise DlqError(f"no dead letter at {topic} partition {partition} offset {offset}")
    d = _row(rows[0])
    d.event = decode(d.payload)
    return d


def parse_which(text: str, topic: str) -> tuple[str, int, int]:
    """`PARTITION:OFFSET` (on the configured topic) or `TOPIC:PARTITION:OFFSET`."""
    parts = text.rsplit(":", 2)
    try:
        if len(parts) == 2:
            return topic, int(parts[0]), int(parts[1])
        if len(parts) == 3:
            return parts[0], int(parts[1]), int(parts[2])
    except ValueError:
        pass
    raise DlqError(f"not a dead letter: {text!r} (PARTITION:OFFSET, as `dlq list` prints it)")


def decoder_of(decode_bytes: Callable[[bytes], DecodedEvent]) -> Decode:
    """`decode` for the reads above: a payload that does not decode is None (it stays a
    dead letter); a schema registry that cannot be reached is said so, loudly."""

    def decode(payload: bytes) -> DecodedEvent | None:
        try:
            return decode_bytes(payload)
        except DecodeError:
            return None
        except SchemaSourceUnavailable as exc:
            raise DlqError(f"the schema registry cannot be reached: {exc}") from None

    return decode


def with_redrives(store: Backend, rows: list[DeadLetterRow]) -> None:
    """Attach each dead letter's re-drives (run id, newest state, where its copy went): a
    keyed read of the rows' own coordinates."""
    if not rows:
        return

    keys = pa.table(
        {
            "topic": pa.array([d.topic for d in rows]),
            "partition": pa.array([d.partition for d in rows], pa.uint32()),
            "offset": pa.array([d.offset for d in rows], pa.uint64()),
        }
    )
    found = store.query_with(
        """SELECT topic, partition, offset, redrive_id, max(state),
                  argMax(copy_partition, state), argMax(copy_offset, state), min(at)
           FROM dlq_redrives
           WHERE topic IN (SELECT topic FROM $keys)
             AND (topic, partition, offset) IN (SELECT topic, partition, offset FROM $keys)
           GROUP BY topic, partition, offset, redrive_id
           ORDER BY min(at)""",
        {"keys": keys},
    )
    by_key = {(d.topic, d.partition, d.offset): d for d in rows}
    for t, p, o, rid, state, cp, co, _ in found:
        d = by_key.get((str(t), int(p), int(o)))
        if d is not None:
            d.redrives.append((str(rid), int(state), int(cp), int(co)))


def copy_outcomes(store: Backend, topic: str, copies: list[tuple[int, int]]) -> dict[int, str]:
    """What became of re-driven copies (partition, offset) -> by offset: a dead letter
    again (its reason) or a late event; keyed reads of both tables."""
    out: dict[int, str] = {}
    for p, o in copies:
        params = {"t": topic, "p": p, "o": o}
        where = "topic = {t:String} AND partition = {p:UInt32} AND offset = {o:UInt64}"
        dead = store.query(f"SELECT reason FROM dead_letters FINAL WHERE {where}", params)
        late = store.query(f"SELECT meter FROM late_events FINAL WHERE {where}", params)
        if dead:
            out[o] = f"a dead letter again ({dead[0][0]})"
        elif late:
            out[o] = f"a late event of {late[0][0]} (not in the totals)"
    return out
