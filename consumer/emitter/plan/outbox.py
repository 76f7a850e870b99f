"""The outbox: push intents in stripe_pushes, planned, read and marked.

Aggregated intents are planned as delta = window total - everything already intended for
that (meter, customer, bucket), each with the next revision and its own identifier, and
written before anything is sent. Every later fact about a push is a new row with a higher
status rank (ReplacingMergeTree(status_rank) keeps the highest), so marks written in any
order converge, and a rewrite of an intent (a range re-formed after a crash) can never hide
that the push was already attempted. Ranks, in the only order a push may move through them:

    1 PENDING     intent, never sent (written by the sink and the planner)
    2 SENT_V1     a delivered mark written before migration 7; read as SENT
    3 ATTEMPTED   first_attempt_at recorded just before the first send; outcome unknown
    4 EXPIRED     held: past Stripe's 35-day timestamp limit and never delivered
    5 REDATED     re-dated to the oldest timestamp Stripe accepts (policy); outcome unknown
    6 SENT        delivered: a 2xx, a duplicate answer, or confirmed by an event summary
    7 REJECTED    refused by Stripe's asynchronous error report after a 2xx; not billed
    8 CANCELLED   its usage was cancelled: never sent, or cancelled at Stripe by an
                  adjustment (corrections.py); not billed

Open work. Every push not yet settled (SENT_V1, SENT, CANCELLED) has a row in
`stripe_open` (migration 18), so the reads a cycle makes (what to send, to check, to hold)
select from `stripe_pushes` only the identifiers named there, by key, never the outbox's
history. Three rules keep it from ever hiding an open push:

    - a row at an open rank goes to stripe_open before stripe_pushes (a crash leaves at
      most a name without a push: readers find no row and skip it);
    - a row at a settled rank goes to stripe_open after stripe_pushes (a crash leaves a
      name whose push is settled: readers skip it, tidy() records it settled);
    - tidy() deletes a name only up to the rank it saw settled, which stripe_pushes
      already holds; a pending row rewritten later for a settled push (a re-formed
      range) comes back as a name whose push is settled, and is skipped and tidied again.

Reads by summary minute (for the delivery checks) are in minutes.py; counts and views for
alerts and people are in standing.py.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from decimal import Decimal
from typing import NamedTuple

import pyarrow as pa

from consumer import crash_points
from consumer.config import MeterConfig
from consumer.emitter.plan.buckets import bucket_sql
from consumer.emitter.plan.identifiers import aggregated_identifier
from consumer.records import DECIMAL, TIME_MS
from consumer.store.backend import Backend, Row, StoreUnavailable

log = logging.getLogger(__name__)

PENDING, SENT_V1, ATTEMPTED, EXPIRED, REDATED, SENT, REJECTED, CANCELLED = 1, 2, 3, 4, 5, 6, 7, 8
DELIVERED = (SENT_V1, SENT)
AWAITING = (PENDING, ATTEMPTED, REDATED)
SETTLED = (SENT_V1, SENT, CANCELLED)
HELD = (EXPIRED, REJECTED)
_SETTLED_SQL = f"({', '.join(map(str, SETTLED))})"  # SETTLED as an SQL list
# Pushes that may still be open: named in stripe_open, not settled, and not a hold that
# stripe_pushes was seen to hold. A read of open work adds this to its read of
# stripe_pushes, which then selects the granules of these identifiers only (its key).
_OPEN_NAMES = f"status_rank NOT IN {_SETTLED_SQL} AND held = 0"
OPEN_SQL = f"identifier IN (SELECT identifier FROM stripe_open FINAL WHERE {_OPEN_NAMES})"
# The same, also with the checked expired pushes (the re-date policy sends them).
_OPEN_OR_EXPIRED_NAMES = (
    f"status_rank NOT IN {_SETTLED_SQL} AND (held = 0 OR status_rank = {EXPIRED})"
)
OPEN_OR_EXPIRED_SQL = (
    f"identifier IN (SELECT identifier FROM stripe_open FINAL WHERE {_OPEN_OR_EXPIRED_NAMES})"
)
TIDY_AT = 1_000  # settled names deleted from stripe_open once there are this many


def any_open(store: Backend, expired: bool = False) -> bool:
    """Whether stripe_open names a push the open-work reads follow (OPEN_SQL, or with
    `expired` OPEN_OR_EXPIRED_SQL). Each such read asks this first: stripe_pushes' key is
    analysed part by part even for an empty set of names, a cost that grows with the
    outbox, so a cycle with nothing open never reads stripe_pushes."""
    names = _OPEN_OR_EXPIRED_NAMES if expired else _OPEN_NAMES
    return bool(store.query(f"SELECT 1 FROM stripe_open FINAL WHERE {names} LIMIT 1"))


# Rank 1 with a first attempt is a row written before ranks 3-7 existed: treat it as attempted.
ATTEMPTED_SQL = (
    "(status_rank IN (3, 5) OR (status_rank = 1 AND toUnixTimestamp64Milli(first_attempt_at) > 0))"
)
# A push row as from_row() reads it; shared with minutes.py so both decode rows alike.
COLUMNS = """identifier, mode, meter, stripe_event_name, customer_id,
              toUnixTimestamp64Milli(bucket_start), revision, toString(value),
              toUnixTimestamp64Milli(first_attempt_at), status_rank,
              toUnixTimestamp64Milli(stripe_timestamp), reason,
              toUnixTimestamp64Milli(updated_at), toString(sent_value),
              toUnixTimestamp64Milli(bucket_end), stripe_account"""


class Push(NamedTuple):
    """One push intent. A tuple, not a dataclass: the emitter builds and moves tens of
    thousands a second, and a frozen dataclass costs three to six times as much per copy."""

    identifier: str
    mode: str
    meter: str
    stripe_event_name: str
    customer_id: str
    bucket_ms: int
    revision: int
    value: Decimal
    first_attempt_ms: int
    status: int = PENDING
    stripe_ms: int = 0  # the timestamp sent to Stripe; 0 = bucket_ms (not re-dated)
    reason: str = ""
    updated_ms: int = 0
    sent: Decimal | None = None  # what the first send carried (units.py); fixed from then on
    bucket_end_ms: int = 0  # aggregated: where the bucket ends (buckets.py); 0 = per event
    account: str = ""  # the connected account it goes to (accounts.py); "" = the platform

    @property
    def timestamp_ms(self) -> int:
        """What Stripe sees as the event's time."""
        return self.stripe_ms or self.bucket_ms

    @property
    def attempted(self) -> bool:
        """Sent at least once (or about to be): Stripe may already hold it."""
        return self.status in (ATTEMPTED, REDATED) or (
            self.status == PENDING and self.first_attempt_ms > 0
        )

    def moved(
        self,
        status: int,
        *,
        first_attempt_ms: int | None = None,
        sent: Decimal | None = None,
        reason: str | None = None,
        stripe_ms: int | None = None,
        account: str | None = None,
    ) -> Push:
        """This push at `status`, with the fields given changed (None keeps a field)."""
        return Push(
            self.identifier,
            self.mode,
            self.meter,
            self.stripe_event_name,
            self.customer_id,
            self.bucket_ms,
            self.revision,
            self.value,
            self.first_attempt_ms if first_attempt_ms is None else first_attempt_ms,
            status,
            self.stripe_ms if stripe_ms is None else stripe_ms,
            self.reason if reason is None else reason,
            self.updated_ms,
            self.sent if sent is None else sent,
            self.bucket_end_ms,
            self.account if account is None else account,
        )


def from_row(row: Row) -> Push:
    """A push from a row selected with COLUMNS."""
    i, mo, me, s, c, b, r, v, f, rank, ts, why, up, sent, end, acct = row
    bucket, stripe_ts = int(b), int(ts)
    return Push(
        str(i),
        str(mo),
        str(me),
        str(s),
        str(c),
        bucket,
        int(r),
        Decimal(v),
        int(f),
        int(rank),
        0 if stripe_ts == bucket else stripe_ts,
        str(why),
        int(up),
        None if sent is None else Decimal(sent),
        int(end),
        str(acct),
    )


class BucketingChanged(Exception):
    """Pushes were planned under other buckets; planning the new ones would bill twice."""


def plan_aggregated(
    store: Backend,
    meter: MeterConfig,
    since_ms: int,
    anchors_ms: Sequence[int] = (),
    check: bool = True,
    buckets: Sequence[tuple[str, int]] | None = None,
) -> list[Push]:
    """New intents for every bucket whose total grew past what was already intended.

    Rejected and expired pushes count as intended: their usage is held for a person, never
    planned again behind their back. Cancelled pushes do not count. A bucket whose total
    fell (its usage was cancelled) is never planned a negative delta: corrections.py takes
    its pushes back first. Buckets are cut at `anchors_ms` (buckets.py); `buckets`: only
    these (customer, bucket start) ones, as bucket_deltas."""
    name = meter.stripe_event_name or ""
    out = []
    for customer, bucket_ms, end_ms, delta, max_rev in bucket_deltas(
        store, meter, since_ms, anchors_ms, "w.total > p.pushed", check, buckets
    ):
        rev = max_rev + 1
        ident = aggregated_identifier(meter.name, customer, bucket_ms, rev)
        push = Push(
            ident, "aggregated", meter.name, name, customer, bucket_ms, rev, delta, 0,
            bucket_end_ms=end_ms,
        )  # fmt: skip
        out.append(push)
    return out


def bucket_deltas(
    store: Backend,
    meter: MeterConfig,
    since_ms: int,
    anchors_ms: Sequence[int],
    where: str,
    check: bool = True,
    buckets: Sequence[tuple[str, int]] | None = None,
) -> list[tuple[str, int, int, Decimal, int]]:
    """(customer, bucket, bucket end, total - intended, highest revision) of every bucket
    matching `where` (on `w.total` and `p.pushed`), oldest first; of the (customer, bucket
    start) `buckets` only, when given (queue.py names them). `check` refuses buckets the
    configuration no longer draws (BucketingChanged): a process checks each meter once, as
    its own configuration cannot change and it is the store's only emitter.

    Pushes are read through the outbox's by_bucket projection (migration 21), every version
    of each, keeping a push's newest rank as FINAL would. A bucket holding a window from
    `since_ms` on starts less than one window_seconds before it, so that bound on the
    pushes keeps every push of every bucket read."""
    params: dict[str, object] = {
        "m": meter.name,
        "sec": meter.window_seconds,
        "since": since_ms,
        "after": since_ms - meter.window_seconds * 1000,
        "anchors": list(anchors_ms),
        "cancelled": CANCELLED,
    }
    if check:
        _check_bucketing(store, meter, params)
    start, end = bucket_sql("window_start")
    measure = "sum_value" if meter.aggregation == "sum" else "toDecimal128(event_count, 9)"
    inputs: dict[str, pa.Table] = {}
    of_windows = of_pushes = named = ""
    if buckets is not None:
        if not buckets:
            return []
        inputs["buckets"] = pa.table(
            {
                "customer_id": pa.array([c for c, _ in buckets], pa.string()),
                "bucket": pa.array([b for _, b in buckets], pa.int64()),
            }
        )
        params["lo"] = min(b for _, b in buckets)
        params["hi"] = max(b for _, b in buckets) + meter.window_seconds * 1000
        of_windows, of_pushes = (
            f"""AND customer_id IN (SELECT customer_id FROM $buckets)
                AND {col} >= fromUnixTimestamp64Milli({{lo:Int64}}, 'UTC')
                AND {col} < fromUnixTimestamp64Milli({{hi:Int64}}, 'UTC')"""
            for col in ("window_start", "bucket_start")
        )
        named = """AND (w.customer_id, toUnixTimestamp64Milli(w.bucket))
                       IN (SELECT customer_id, bucket FROM $buckets)"""
    sql = f"""SELECT w.customer_id, toUnixTimestamp64Milli(w.bucket),
                  toUnixTimestamp64Milli(w.bucket_end), toString(w.total - p.pushed), p.max_rev
           FROM (SELECT customer_id, {start} AS bucket, any({end}) AS bucket_end,
                        sum({measure}) AS total
                 FROM usage_windows FINAL
                 WHERE meter = {{m:String}}
                   AND window_start >= fromUnixTimestamp64Milli({{since:Int64}}, 'UTC')
                   {of_windows}
                 GROUP BY customer_id, bucket) AS w
           LEFT JOIN (SELECT customer, bucket, sumIf(val, rank != {{cancelled:UInt8}}) AS pushed,
                             max(rev) AS max_rev
                      FROM (SELECT identifier, any(customer_id) AS customer,
                                   any(bucket_start) AS bucket, any(revision) AS rev,
                                   argMax(value, status_rank) AS val, max(status_rank) AS rank
                            FROM stripe_pushes
                            WHERE mode = 'aggregated' AND meter = {{m:String}}
                              AND bucket_start > fromUnixTimestamp64Milli({{after:Int64}}, 'UTC')
                              {of_pushes}
                            GROUP BY identifier)
                      GROUP BY customer, bucket) AS p
             ON w.customer_id = p.customer AND w.bucket = p.bucket
           WHERE {where} {named}
           ORDER BY w.bucket, w.customer_id"""
    rows = store.query_with(sql, inputs, params) if inputs else store.query(sql, params)
    return [(str(c), int(b), int(e), Decimal(d), int(r)) for c, b, e, d, r in rows]


def _check_bucketing(store: Backend, meter: MeterConfig, params: dict[str, object]) -> None:
    """Refuse to plan when recent pushes were made for buckets the configuration no longer
    draws: their minutes would be planned again, and billed twice."""
    start, end = bucket_sql("bucket_start")
    rows = store.query(
        f"""SELECT count(), any(toString(bucket_start)) FROM stripe_pushes FINAL
           WHERE mode = 'aggregated' AND meter = {{m:String}}
             AND bucket_start >= fromUnixTimestamp64Milli({{since:Int64}}, 'UTC')
             AND toUnixTimestamp64Milli(bucket_end) > 0
             AND (bucket_start != {start} OR bucket_end != {end})""",
        params,
    )
    if rows and int(rows[0][0]):
        raise BucketingChanged(
            f"meter {meter.name}: {rows[0][0]} pushes of the last 35 days (first at "
            f"{rows[0][1]}) were planned for other buckets than window_seconds="
            f"{meter.window_seconds} and stripe.period_anchor now draw. Planning the new "
            "buckets would bill those minutes twice: restore the previous settings, or "
            "change them only once no push of the last 35 days is left"
        )


def sendable(store: Backend, limit_ms: int, blind_after_ms: int, limit: int) -> list[Push]:
    """Pushes that may go to Stripe now, oldest first: never attempted, or attempted so
    recently (first attempt after `blind_after_ms`) that Stripe still remembers the
    identifier; and timestamped inside Stripe's window (at or after `limit_ms`)."""
    if not any_open(store):
        return []
    rows = store.query(
        f"""SELECT {COLUMNS} FROM stripe_pushes FINAL
           WHERE {OPEN_SQL}
             AND stripe_timestamp >= fromUnixTimestamp64Milli({{lim:Int64}}, 'UTC')
             AND ((status_rank = 1 AND toUnixTimestamp64Milli(first_attempt_at) = 0)
                  OR ({ATTEMPTED_SQL}
                      AND first_attempt_at > fromUnixTimestamp64Milli({{blind:Int64}}, 'UTC')))
           ORDER BY bucket_start, identifier LIMIT {{n:UInt32}}""",
        {"lim": limit_ms, "blind": blind_after_ms, "n": limit},
    )
    return [from_row(r) for r in rows]


def never_sent(store: Backend, limit_ms: int, limit: int) -> list[Push]:
    """Pushes never attempted, timestamped inside Stripe's window, oldest first."""
    if not any_open(store):
        return []
    rows = store.query(
        f"""SELECT {COLUMNS} FROM stripe_pushes FINAL
           WHERE {OPEN_SQL}
             AND stripe_timestamp >= fromUnixTimestamp64Milli({{lim:Int64}}, 'UTC')
             AND status_rank = 1 AND toUnixTimestamp64Milli(first_attempt_at) = 0
           ORDER BY bucket_start, identifier LIMIT {{n:UInt32}}""",
        {"lim": limit_ms, "n": limit},
    )
    return [from_row(r) for r in rows]


class ReadAhead:
    """Never-sent pushes read `size` at a time, handed out in order. The outbox is read
    again only once every push handed out has been taken (its first attempt written), so
    a read never returns a push already handed out. Only assign() moves a never-sent push
    while a cycle sends; the emitter clears this before each cycle's sending."""

    def __init__(self, store: Backend, size: int) -> None:
        self._store = store
        self._size = size
        self._queue: list[Push] = []

    def clear(self) -> None:
        self._queue = []

    def take(self, n: int, limit_ms: int) -> list[Push]:
        """Up to `n` never-sent pushes timestamped at or after `limit_ms`, oldest first."""
        if not self._queue:
            self._queue = never_sent(self._store, limit_ms, max(n, self._size))[::-1]
        out = [self._queue.pop() for _ in range(min(n, len(self._queue)))]
        return [p for p in out if p.timestamp_ms >= limit_ms]


def past_limit(store: Backend, limit_ms: int, include_expired: bool, limit: int) -> list[Push]:
    """Never-attempted pushes timestamped before `limit_ms` (Stripe would refuse them), and
    with `include_expired` the ones already held as expired."""
    ranks = [PENDING, EXPIRED] if include_expired else [PENDING]
    names = OPEN_OR_EXPIRED_SQL if include_expired else OPEN_SQL
    if not any_open(store, include_expired):
        return []
    rows = store.query(
        f"""SELECT {COLUMNS} FROM stripe_pushes FINAL
           WHERE {names}
             AND stripe_timestamp < fromUnixTimestamp64Milli({{lim:Int64}}, 'UTC')
             AND status_rank IN {{ranks:Array(UInt8)}}
             AND toUnixTimestamp64Milli(first_attempt_at) = 0
           ORDER BY bucket_start, identifier LIMIT {{n:UInt32}}""",
        {"lim": limit_ms, "ranks": ranks, "n": limit},
    )
    return [from_row(r) for r in rows]


def of_buckets(store: Backend, meter: str, keys: Sequence[tuple[str, int]]) -> list[Push]:
    """Every aggregated push of (customer, bucket) `keys` of `meter`, in any status."""
    if not keys:
        return []
    # Names through the by_bucket projection (the outbox is keyed by identifier), then
    # the pushes by their key.
    found = store.query(
        """SELECT DISTINCT identifier FROM stripe_pushes
           WHERE mode = 'aggregated' AND meter = {m:String}
             AND customer_id IN {customers:Array(String)}
             AND (customer_id, toUnixTimestamp64Milli(bucket_start))
                 IN {keys:Array(Tuple(String, Int64))}""",
        {"m": meter, "customers": sorted({c for c, _ in keys}), "keys": list(keys)},
    )
    pushes = by_identifier(store, sorted(str(i) for (i,) in found))
    return sorted(pushes, key=lambda p: (p.bucket_ms, p.customer_id, p.revision))


def by_identifier(store: Backend, identifiers: Sequence[str]) -> list[Push]:
    if not identifiers:
        return []
    rows = store.query(
        f"""SELECT {COLUMNS} FROM stripe_pushes FINAL
           WHERE identifier IN {{ids:Array(String)}} ORDER BY identifier""",
        {"ids": list(identifiers)},
    )
    return [from_row(r) for r in rows]


def write(store: Backend, pushes: Sequence[Push], rank: int, now_ms: int) -> None:
    """Write every push at `rank` (its first attempt, timestamp and reason as they are)."""
    _insert(store, pushes, [rank] * len(pushes), now_ms)


def write_moved(store: Backend, pushes: Sequence[Push], now_ms: int) -> None:
    """Write pushes, each at its own rank, in one insert: what one cycle decides about a set
    of pushes lands together or not at all."""
    _insert(store, pushes, [p.status for p in pushes], now_ms)


def _insert(store: Backend, pushes: Sequence[Push], ranks: list[int], now_ms: int) -> None:
    """Write the rows, naming them in stripe_open in the order the rules above need."""
    if not pushes:
        return
    rows = list(zip(pushes, ranks, strict=True))
    _name(store, [(p, r, 0) for p, r in rows if r not in SETTLED])
    crash_points.reached("after_open_names")
    _insert_pushes(store, pushes, ranks, now_ms)
    settled = [(p, r, 0) for p, r in rows if r in SETTLED]
    if not settled:
        return
    crash_points.reached("after_settled_marks")
    try:
        _name(store, settled)
    except StoreUnavailable as exc:  # the marks are written; tidy() finds these settled later
        log.warning("settled pushes not yet recorded in stripe_open: %s", exc)


def _name(store: Backend, rows: Sequence[tuple[Push, int, int]]) -> None:
    """(push, rank, held) rows of stripe_open; a checked hold outranks an unchecked one."""
    if not rows:
        return
    store.insert_columns(
        "stripe_open",
        {
            "identifier": pa.array([p.identifier for p, _, _ in rows]),
            "status_rank": pa.array([r for _, r, _ in rows], pa.uint8()),
            "held": pa.array([h for _, _, h in rows], pa.uint8()),
            "version": pa.array([2 * r + h for _, r, h in rows], pa.uint8()),
            "stripe_timestamp": pa.array([p.timestamp_ms for p, _, _ in rows], TIME_MS),
        },
    )


def tidy(store: Backend, settled_at: int = TIDY_AT) -> None:
    """Keep stripe_open to the open work: record as settled (or as checked holds) the names
    whose push stripe_pushes holds so, and delete the settled names once there are
    `settled_at` of them and at least as many as open ones. Needed only for cost: readers
    skip such names anyway."""
    if any_open(store):
        found = store.query(
            f"""SELECT {COLUMNS} FROM stripe_pushes FINAL
               WHERE {OPEN_SQL} AND status_rank IN {{done:Array(UInt8)}}""",
            {"done": [*SETTLED, *HELD]},
        )
        pushes = [from_row(r) for r in found]
        _name(store, [(p, p.status, int(p.status in HELD)) for p in pushes])
    ((settled_n, open_n),) = store.query(
        f"""SELECT countIf(status_rank IN {_SETTLED_SQL}),
                  countIf(status_rank NOT IN {_SETTLED_SQL})
           FROM stripe_open FINAL"""
    )
    if int(settled_n) < max(settled_at, int(open_n), 1):
        return
    # Names whose newest row is settled, chosen by ClickHouse (no id list travels: it would
    # grow with the open work). A row written after the mutation starts is in a new part and
    # stays; one written before it is seen by the subquery, so a name whose newest row is
    # a later rank (a rejection after a send) is not chosen. The set is built per replica
    # (hence the setting); a row left behind only costs a read, never a decision.
    store.command(
        f"""ALTER TABLE stripe_open
           DELETE WHERE identifier IN (
               SELECT identifier FROM stripe_open FINAL WHERE status_rank IN {_SETTLED_SQL})
           SETTINGS mutations_sync = 1, allow_nondeterministic_mutations = 1"""
    )


def _insert_pushes(store: Backend, pushes: Sequence[Push], ranks: list[int], now_ms: int) -> None:
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
            "status_rank": pa.array(ranks, pa.uint8()),
            "first_attempt_at": pa.array([p.first_attempt_ms for p in pushes], TIME_MS),
            "updated_at": pa.array([now_ms] * n, TIME_MS),
            "stripe_timestamp": pa.array([p.timestamp_ms for p in pushes], TIME_MS),
            "reason": pa.array([p.reason for p in pushes]),
            "sent_value": pa.array([p.sent for p in pushes], DECIMAL),
            "bucket_end": pa.array([p.bucket_end_ms for p in pushes], TIME_MS),
            "stripe_account": pa.array([p.account for p in pushes]),
        },
    )
