"""`dlq show` and `dlq list` output: a dead letter in full, and lists as a table, JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from consumer.decode.wire import HEADER_SIZE, MAGIC, header_schema_id
from consumer.ops.dlq.links import STATES
from consumer.ops.dlq.select import DeadLetterRow
from consumer.ops.totals import format_table

LIST_COLUMNS = ["which", "record_time", "reason", "event_name", "event_id", "redrive", "detail"]
FIELDS = [
    "which", "topic", "partition", "offset", "record_time", "reason", "event_name", "event_id",
    "customer_id", "redrive", "redrive_of", "detail",
]  # fmt: skip


def when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def redrive_text(d: DeadLetterRow) -> str:
    """Where this dead letter's re-drives went, or what it is a copy of."""
    parts = []
    if d.redrive_of:
        parts.append(f"copy of {_which(d.redrive_of, d.topic)}")
    for _, state, p, o in d.redrives[-1:]:
        parts.append(f"sent as {p}:{o}" if o >= 0 else STATES[state])
    if len(d.redrives) > 1:
        parts.append(f"({len(d.redrives)} runs)")
    return " ".join(parts)


def _which(link: str, topic: str) -> str:
    """A REDRIVE_OF link (topic/partition/offset) as `dlq show` takes it."""
    parts = link.rsplit("/", 2)
    if len(parts) == 3:
        return f"{parts[1]}:{parts[2]}" if parts[0] == topic else ":".join(parts)
    return link


def _record(d: DeadLetterRow) -> dict[str, Any]:
    e = d.event
    return {
        "which": d.which,
        "topic": d.topic,
        "partition": d.partition,
        "offset": d.offset,
        "record_time": when(d.record_time_ms),
        "reason": d.reason,
        "event_name": e.event_name if e else "",
        "event_id": e.event_id if e else "",
        "customer_id": e.customer_id if e else "",
        "redrive": redrive_text(d),
        "redrive_of": d.redrive_of,
        "detail": d.detail,
    }


def format_list(rows: Sequence[DeadLetterRow], fmt: str) -> str:
    records = [_record(d) for d in rows]
    if fmt == "json":
        return "\n".join(json.dumps(r, sort_keys=True) for r in records)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(records)
        return buf.getvalue().rstrip("\n")
    table = [[_cut(str(r[c]), 60) for c in LIST_COLUMNS] for r in records]
    return "\n".join(line.rstrip() for line in format_table(LIST_COLUMNS, table).splitlines())


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


HEX_LIMIT = 4096  # bytes dumped; a dead letter may be as large as the topic allows


def hexdump(data: bytes, width: int = 16, limit: int = HEX_LIMIT) -> list[str]:
    lines = []
    for at in range(0, min(len(data), limit), width):
        chunk = data[at : at + width]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"  {at:08x}  {chunk.hex(' '):<{width * 3}} {text}")
    if len(data) > limit:
        lines.append(f"  ... {len(data) - limit} more bytes")
    return lines


def format_one(d: DeadLetterRow, outcomes: dict[int, str] | None = None) -> str:
    """Coordinates, reason, headers, re-drives, and the original bytes decoded where they
    decode (a hex dump where they do not)."""
    out = [
        f"dead letter  {d.topic} partition {d.partition} offset {d.offset}",
        f"record time  {when(d.record_time_ms)}",
        f"written at   {when(d.written_at_ms)}",
        f"reason       {d.reason}",
        f"detail       {d.detail}",
        f"key          {d.key.decode(errors='replace')!r}",
        "headers" + ("" if d.headers else "      (none)"),
        *(f"  {k} = {v.decode(errors='replace')!r}" for k, v in d.headers),
    ]
    if d.redrive_of:
        out.append(f"re-driven from {_which(d.redrive_of, d.topic)}")
    for rid, state, p, o in d.redrives:
        where = f" as partition {p} offset {o}" if o >= 0 else ""
        became = (outcomes or {}).get(o) if o >= 0 else None
        if o >= 0:  # what the consumer made of it, where a keyed read can tell
            where += (
                f": {became}"
                if became
                else ": counted, or a duplicate of a counted copy (once consumed)"
            )
        out.append(f"re-drive     {rid}: {STATES[state]}{where}")
    sid = header_schema_id(d.payload)
    if sid is not None:
        out.append(f"wire header  magic {MAGIC}, schema id {sid} ({HEADER_SIZE} bytes)")
    elif d.payload:
        out.append(f"wire header  none (first byte {d.payload[0]:#04x}, not magic {MAGIC})")
    out.append(f"payload      {len(d.payload)} bytes")
    if d.event is not None:
        e = d.event
        out.append("decoded")
        fields = {
            "event_id": e.event_id,
            "event_name": e.event_name,
            "customer_id": e.customer_id,
            "value": format(e.value, "f"),
            "timestamp": f"{when(e.timestamp_ms)} ({e.timestamp_ms})",
            "properties": json.dumps(e.properties, sort_keys=True),
            "cancels": e.cancels,
        }
        out += [f"  {k:<12} {v}" for k, v in fields.items() if v != ""]
    else:
        out.append("hex (the payload does not decode)")
        out += hexdump(d.payload)
    return "\n".join(out)
