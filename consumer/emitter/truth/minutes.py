"""The outbox by event-summary minute: the reads behind the delivery checks (verify.py).

Stripe's event summaries count per (event name, customer, minute), not per identifier, so
a check reads every push of one such minute, whatever its status.
"""

from __future__ import annotations

from dataclasses import dataclass

from consumer.emitter.plan.outbox import (
    ATTEMPTED_SQL,
    COLUMNS,
    OPEN_SQL,
    Push,
    any_open,
    from_row,
)
from consumer.store.backend import Backend


@dataclass(frozen=True, slots=True)
class BucketKey:
    """Where Stripe's event summaries can see a push: event name, customer, UTC minute."""

    stripe_event_name: str
    customer_id: str
    minute_ms: int


def due_buckets(store: Backend, due_ms: int, limit_ms: int, limit: int) -> list[BucketKey]:
    """Minutes holding an attempted push whose outcome must be checked, not guessed: first
    attempted at or before `due_ms`, or timestamped before `limit_ms`."""
    if not any_open(store):
        return []
    rows = store.query(
        f"""SELECT stripe_event_name, customer_id,
                  toUnixTimestamp(toStartOfMinute(stripe_timestamp)) * 1000 AS minute
           FROM stripe_pushes FINAL
           WHERE {OPEN_SQL} AND {ATTEMPTED_SQL}
             AND (first_attempt_at <= fromUnixTimestamp64Milli({{due:Int64}}, 'UTC')
                  OR stripe_timestamp < fromUnixTimestamp64Milli({{lim:Int64}}, 'UTC'))
           GROUP BY stripe_event_name, customer_id, minute
           ORDER BY minute, stripe_event_name, customer_id LIMIT {{n:UInt32}}""",
        {"due": due_ms, "lim": limit_ms, "n": limit},
    )
    return [BucketKey(str(e), str(c), int(m)) for e, c, m in rows]


def bucket_rows(store: Backend, key: BucketKey) -> list[Push]:
    """Every push, in any status, that Stripe would count in this minute's summary."""
    rows = store.query(
        f"""SELECT {COLUMNS} FROM stripe_pushes FINAL
           WHERE stripe_event_name = {{e:String}} AND customer_id = {{c:String}}
             AND stripe_timestamp >= fromUnixTimestamp64Milli({{lo:Int64}}, 'UTC')
             AND stripe_timestamp < fromUnixTimestamp64Milli({{hi:Int64}}, 'UTC')
           ORDER BY identifier""",
        {
            "e": key.stripe_event_name,
            "c": key.customer_id,
            "lo": key.minute_ms,
            "hi": key.minute_ms + 60_000,
        },
    )
    return [from_row(r) for r in rows]
