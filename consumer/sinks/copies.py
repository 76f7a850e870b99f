"""Copies of one event that two processes both accepted: one counts, the other is superseded.

The dedup key is (meter, event id), while a ledger row's identity also holds the event's
minute and customer. Within a process the ledger lock makes a batch's question and its
write one step (ingest/ledger_lock.py); two processes have no such step, so each can accept
a copy of one event its producer stamped in another minute before the other's row is
written. Each process writes first and settles after (on the rollup thread, before the
recompute), so whichever settles second sees both rows.

Settling is deterministic, so both processes agree: of two copies within the dedup horizon
of each other, the one with the larger (minute, customer) is superseded, named in
`ledger_superseded` before any window is recomputed without it. The recompute leaves the
named rows out (`NOT_SUPERSEDED`) and is run for both copies' windows, so a window that
counted a loser is rewritten with a newer version. A crash leaves the window job pending:
it settles again, which converges.

A read bounded like the dedup question: the job's own rows are found in its minutes at its
positions; their copies by the 8-byte id key, in the minutes within the horizon of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from consumer.sinks.horizon import spans
from consumer.store.backend import Backend

Span = tuple[int, int, int]  # (partition, start, end) of a range of the batch
_MINUTE = 60_000
_WINDOW_START = pa.timestamp("s", tz="UTC")

# The ledger rows a recompute of the minutes {mm} leaves out.
NOT_SUPERSEDED = """(meter, customer_id, event_id, toStartOfMinute(event_time)) NOT IN (
        SELECT meter, customer_id, event_id, minute FROM ledger_superseded
        WHERE (meter, minute) IN {mm:Array(Tuple(String, DateTime('UTC')))})"""


def at_positions(spans_: Sequence[Span]) -> str:
    """SQL: the row's source position lies in one of the spans (integers only)."""
    return " OR ".join(
        f"(partition = {int(p)} AND offset >= {int(a)} AND offset < {int(b)})" for p, a, b in spans_
    )


def settle_copies(
    store: Backend,
    topic: str,
    positions: Sequence[Span],
    minutes: Sequence[tuple[str, int]],
    horizon_ms: int,
) -> pa.Table:
    """Name the superseded copies among the job's rows (those of `topic` at `positions` in
    `minutes`) and the copies of them within `horizon_ms`; returns the windows of both
    sides of every such pair, to be recomputed: the loser's loses it, and the winner's
    may never have counted it (its batch crashed before its job ran, and was re-formed
    as a duplicate of the loser: WindowJob.of_batch's `held`). Two stamps of one ledger
    identity (same minute and customer) are one row, so neither loses, but their window is
    recomputed too: the row the ledger keeps may be the one written last."""
    if not positions or not minutes:
        return _windows([])
    near = " OR ".join(
        f"event_time BETWEEN fromUnixTimestamp64Milli({lo}, 'UTC') "
        f"AND fromUnixTimestamp64Milli({hi}, 'UTC')"
        for lo, hi in spans([w * 1000 for _, w in minutes], horizon_ms + _MINUTE)
    )
    mine = f"""SELECT meter, event_id, customer_id, event_time, id_key FROM usage_events
               WHERE (meter, toStartOfMinute(event_time))
                        IN {{mm:Array(Tuple(String, DateTime('UTC')))}}
                 AND topic = {{t:String}} AND ({at_positions(positions)})"""
    pairs: list[tuple[Any, ...]] = store.query(
        f"""SELECT DISTINCT o.meter, o.event_id,
                   toUnixTimestamp(toStartOfMinute(o.event_time)), o.customer_id,
                   toUnixTimestamp(toStartOfMinute(m.event_time)), m.customer_id
            FROM (SELECT meter, event_id, customer_id, event_time FROM usage_events
                  PREWHERE meter IN {{m:Array(String)}} AND ({near})
                       AND id_key IN (SELECT id_key FROM ({mine}))) AS o
            INNER JOIN ({mine}) AS m ON o.meter = m.meter AND o.event_id = m.event_id
            WHERE (o.event_time, o.customer_id) != (m.event_time, m.customer_id)
              AND abs(toUnixTimestamp64Milli(o.event_time)
                      - toUnixTimestamp64Milli(m.event_time)) <= {int(horizon_ms)}""",
        {"mm": list(minutes), "t": topic, "m": sorted({m for m, _ in minutes})},
    )
    losers: set[tuple[str, int, str, str]] = set()
    touched: set[tuple[str, str, int]] = set()
    for meter, event_id, w1, c1, w2, c2 in pairs:
        theirs, ours = (int(str(w1)), str(c1)), (int(str(w2)), str(c2))
        if theirs != ours:
            loser = max(theirs, ours)
            losers.add((str(meter), loser[0], loser[1], str(event_id)))
        # else one ledger identity stamped twice in its minute: the ledger keeps one row
        # (the first recorded), which may not be the one its window last read
        # both sides: a winner an earlier, crashed attempt wrote was never in a window
        touched |= {(str(meter), c, w) for w, c in (theirs, ours)}
    if losers:
        rows = sorted(losers)
        store.insert_columns(
            "ledger_superseded",
            {
                "meter": pa.array([r[0] for r in rows], pa.string()),
                "minute": pa.array([r[1] for r in rows], _WINDOW_START),
                "customer_id": pa.array([r[2] for r in rows], pa.string()),
                "event_id": pa.array([r[3] for r in rows], pa.string()),
            },
        )
    return _windows(sorted(touched))


def _windows(rows: Sequence[tuple[str, str, int]]) -> pa.Table:
    return pa.table(
        {
            "meter": pa.array([r[0] for r in rows], pa.string()),
            "customer_id": pa.array([r[1] for r in rows], pa.string()),
            "window_start": pa.array([r[2] for r in rows], _WINDOW_START),
        }
    )
