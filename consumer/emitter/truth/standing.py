"""Where the outbox stands as a whole: what the alerts watch and what a person acts on.

Counts and views only; no push moves here.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from consumer.store.backend import Backend


@dataclass(frozen=True, slots=True)
class Backlog:
    """What the alerts watch: the awaiting pushes, their oldest Stripe timestamp, how many
    are near the 35-day limit, and how many are held out of billing."""

    pending: int
    oldest_ms: int
    near_limit: int
    expired: int
    rejected: int


def backlog(store: Backend, alert_before_ms: int) -> Backlog:
    """Counted from the open work (stripe_open, migration 18), not the outbox's history. A
    name whose push was settled a moment ago counts until the cycle's tidy() records it."""
    rows = store.query(
        """SELECT countIf(status_rank IN (1, 3, 5)),
                  toUnixTimestamp64Milli(minIf(stripe_timestamp, status_rank IN (1, 3, 5))),
                  countIf(status_rank IN (1, 3, 5)
                          AND stripe_timestamp < fromUnixTimestamp64Milli({a:Int64}, 'UTC')),
                  countIf(status_rank = 4), countIf(status_rank = 7)
           FROM stripe_open FINAL""",
        {"a": alert_before_ms},
    )
    n, oldest, near, expired, rejected = (int(x) for x in rows[0])
    return Backlog(n, oldest if n else 0, near, expired, rejected)


@dataclass(frozen=True, slots=True)
class Undelivered:
    """A push held out of billing, for a person to act on."""

    identifier: str
    meter: str
    customer_id: str
    bucket_ms: int
    value: Decimal
    status: str
    reason: str


def undelivered(store: Backend) -> list[Undelivered]:
    """Every rejected, quarantined or expired push with its reason: usage not billed."""
    rows = store.query(
        """SELECT identifier, meter, customer_id, toUnixTimestamp64Milli(bucket_start),
                  toString(value), status, reason
           FROM stripe_delivery WHERE status IN ('rejected', 'quarantined', 'expired')
           ORDER BY bucket_start, identifier"""
    )
    return [
        Undelivered(str(i), str(m), str(c), int(b), Decimal(v), str(s), str(r))
        for i, m, c, b, v, s, r in rows
    ]


def status_totals(store: Backend) -> dict[tuple[str, str, str], Decimal]:
    """(customer, meter, status) -> value: sent is what Stripe billed, the rest is not."""
    rows = store.query(
        """SELECT customer_id, meter, status, toString(sum(value)) FROM stripe_delivery
           GROUP BY customer_id, meter, status ORDER BY customer_id, meter, status"""
    )
    return {(str(c), str(m), str(s)): Decimal(v) for c, m, s, v in rows}
