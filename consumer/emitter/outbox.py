"""The outbox: push intents in stripe_pushes, planned, read and marked.

Aggregated intents are planned as delta = window total - everything already intended for
that (meter, customer, bucket), each with the next revision and its own identifier, and
written before anything is sent. Marks are rows with a higher status rank: a request's rows
are marked after its 2xx, never by a high-water mark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

import pyarrow as pa

from consumer.config import MeterConfig
from consumer.identifiers import aggregated_identifier
from consumer.store.backend import DECIMAL, TIME_MS, Backend

PENDING, SENT = 1, 2


@dataclass(frozen=True, slots=True)
class Push:
    identifier: str
    mode: str
    meter: str
    stripe_event_name: str
    customer_id: str
    bucket_ms: int
    revision: int
    value: Decimal
    first_attempt_ms: int


def plan_aggregated(store: Backend, meter: MeterConfig, since_ms: int) -> list[Push]:
    """New intents for every bucket whose total moved past what was already intended."""
    measure = "sum_value" if meter.aggregation == "sum" else "toDecimal128(event_count, 9)"
    rows = store.query(
        f"""SELECT w.customer_id, toUnixTimestamp64Milli(w.bucket), toString(w.total - p.pushed),
                  p.max_rev
           FROM (SELECT customer_id,
                        toDateTime64(toStartOfInterval(window_start,
                                     INTERVAL {{sec:UInt32}} SECOND), 3, 'UTC') AS bucket,
                        sum({measure}) AS total
                 FROM usage_windows FINAL
                 WHERE meter = {{m:String}}
                   AND window_start >= fromUnixTimestamp64Milli({{since:Int64}}, 'UTC')
                 GROUP BY customer_id, bucket) AS w
           LEFT JOIN (SELECT customer_id, bucket_start AS bucket, sum(value) AS pushed,
                             max(revision) AS max_rev
                      FROM stripe_pushes FINAL
                      WHERE mode = 'aggregated' AND meter = {{m:String}}
                      GROUP BY customer_id, bucket) AS p
             ON w.customer_id = p.customer_id AND w.bucket = p.bucket
           WHERE w.total != p.pushed
           ORDER BY w.bucket, w.customer_id""",
        {"m": meter.name, "sec": meter.window_seconds, "since": since_ms},
    )
    name = meter.stripe_event_name or ""
    out = []
    for customer, bucket_ms, delta, max_rev in rows:
        rev = int(max_rev) + 1
        ident = aggregated_identifier(meter.name, str(customer), int(bucket_ms), rev)
        out.append(
            Push(
                ident,
                "aggregated",
                meter.name,
                name,
                str(customer),
                int(bucket_ms),
                rev,
                Decimal(delta),
                0,
            )
        )
    return out


def pending(store: Backend, limit: int) -> list[Push]:
    rows = store.query(
        """SELECT identifier, mode, meter, stripe_event_name, customer_id,
                  toUnixTimestamp64Milli(bucket_start), revision, toString(value),
                  toUnixTimestamp64Milli(first_attempt_at)
           FROM stripe_pushes FINAL WHERE status_rank = 1
           ORDER BY bucket_start, identifier LIMIT {n:UInt32}""",
        {"n": limit},
    )
    return [
        Push(str(i), str(mo), str(me), str(s), str(c), int(b), int(r), Decimal(v), int(f))
        for i, mo, me, s, c, b, r, v, f in rows
    ]


def count_pending(store: Backend) -> tuple[int, int]:
    """(pending pushes, oldest pending bucket in epoch ms or 0)."""
    rows = store.query(
        """SELECT count(), toUnixTimestamp64Milli(min(bucket_start))
           FROM stripe_pushes FINAL WHERE status_rank = 1"""
    )
    n, oldest = rows[0]
    return int(n), int(oldest) if int(n) else 0


def write(store: Backend, pushes: Sequence[Push], rank: int, now_ms: int) -> None:
    """Write intents (rank 1) or marks (rank 2); same identity, the higher rank wins."""
    if not pushes:
        return
    n = len(pushes)
    store.insert_columns(
        "stripe_pushes",
        {
            "identifier": pa.array([p.identifier for p in pushes]),
            "mode": pa.array([p.mode for p in pushes]),
            "meter": pa.array([p.meter for p in pushes]),
            "stripe_event_name": pa.array([p.stripe_event_name for p in pushes]),
            "customer_id": pa.array([p.customer_id for p in pushes]),
            "bucket_start": pa.array([p.bucket_ms for p in pushes], TIME_MS),
            "revision": pa.array([p.revision for p in pushes], pa.uint32()),
            "value": pa.array([p.value for p in pushes], DECIMAL),
            "status_rank": pa.array([rank] * n, pa.uint8()),
            "first_attempt_at": pa.array([p.first_attempt_ms or now_ms for p in pushes], TIME_MS),
            "updated_at": pa.array([now_ms] * n, TIME_MS),
        },
    )
