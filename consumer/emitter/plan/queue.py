"""The windows still to plan (migration 21): a cycle plans and corrects the buckets named
since it last did, instead of every window of the lookback, so its cost follows what
changed, not the store's age.

Names come from the rollup (each window it recomputed, once its row is written) and from
the corrections (each bucket whose pushes they cancelled, once the marks are written). A
cycle takes the names, plans and corrects their buckets, names again the buckets it must
look at next cycle (a correction still waiting for an outcome), then records what it took
as planned with the version it read. A name written again meanwhile has a later version
(the server's clock) and stays to plan; a crash before the record plans the same buckets
again, which finds nothing new: planning is by difference (outbox.bucket_deltas)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa

from consumer.config import MeterConfig
from consumer.emitter.plan.buckets import bucket_of
from consumer.store.backend import Backend

EVERYTHING = ""  # the meter of the name standing for every window (migration 21)
TAKE = 50_000  # names a cycle takes, oldest first; the rest wait for the next
TIDY_AT = 10_000  # planned names deleted once there are this many, and as many as unplanned

_NAMES = pa.schema(
    [
        ("meter", pa.string()),
        ("customer_id", pa.string()),
        ("window_start", pa.timestamp("s", tz="UTC")),
        ("version", pa.timestamp("ns", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class Taken:
    """The names one cycle took: (meter, customer, minute in ms, version in ns)."""

    names: tuple[tuple[str, str, int, int], ...]

    @property
    def everything(self) -> bool:
        return any(m == EVERYTHING for m, _, _, _ in self.names)

    def buckets(
        self, meter: MeterConfig, anchors_ms: Sequence[int], since_ms: int
    ) -> list[tuple[str, int]] | None:
        """(customer, bucket start in ms) of `meter`'s named windows from `since_ms` on, in
        order; None: every bucket (the name standing for every window was taken)."""
        if self.everything:
            return None
        return sorted(
            {
                (c, bucket_of(w, meter.window_seconds, anchors_ms)[0])
                for m, c, w, _ in self.names
                if m == meter.name and w >= since_ms
            }
        )

    def customers(self, meters: Sequence[str]) -> list[tuple[str, str]]:
        """(meter, customer) of the named windows of `meters`, in order."""
        wanted = set(meters)
        return sorted({(m, c) for m, c, _, _ in self.names if m in wanted})


def take(store: Backend, limit: int = TAKE) -> Taken:
    rows = store.query(
        """SELECT meter, customer_id, toUnixTimestamp(window_start) * 1000,
                  toUnixTimestamp64Nano(version)
           FROM planning_queue FINAL WHERE planned = 0
           ORDER BY version LIMIT {n:UInt32}""",
        {"n": limit},
    )
    return Taken(tuple((str(m), str(c), int(w), int(v)) for m, c, w, v in rows))


def name(store: Backend, buckets: Iterable[tuple[str, str, int]]) -> None:
    """Name (meter, customer, bucket start in ms) to plan again, at the server's clock: by
    the first minute from its start (a bucket cut at an anchor may start inside a minute,
    and its first window is the next one)."""
    rows = sorted({(m, c, -(-b // 60_000) * 60_000) for m, c, b in buckets})
    if not rows:
        return
    store.command_with(
        """INSERT INTO planning_queue (meter, customer_id, window_start, version, planned)
           SELECT meter, customer_id, window_start, now64(9, 'UTC'), 0 FROM $names""",
        {"names": _table([(m, c, w, 0) for m, c, w in rows])},
    )


def planned(store: Backend, taken: Taken) -> None:
    """Record the taken names as planned, each with the version it was read at."""
    if taken.names:
        store.command_with(
            """INSERT INTO planning_queue (meter, customer_id, window_start, version, planned)
               SELECT meter, customer_id, window_start, version, 1 FROM $names""",
            {"names": _table(list(taken.names))},
        )


def tidy(store: Backend, at: int = TIDY_AT) -> None:
    """Delete the names whose newest row is planned once there are `at` of them and at
    least as many as unplanned ones: only for cost, as take() skips them. A name written
    again before the delete starts is unplanned in its subquery, so it is not chosen; one
    written after is in a part the delete does not touch."""
    ((done, waiting),) = store.query(
        "SELECT countIf(planned = 1), countIf(planned = 0) FROM planning_queue FINAL"
    )
    if int(done) < max(at, int(waiting), 1):
        return
    store.command(
        """ALTER TABLE planning_queue
           DELETE WHERE (meter, customer_id, window_start) IN (
               SELECT meter, customer_id, window_start FROM planning_queue FINAL
               WHERE planned = 1)
           SETTINGS mutations_sync = 1, allow_nondeterministic_mutations = 1"""
    )


def _table(rows: Sequence[tuple[str, str, int, int]]) -> pa.Table:
    return pa.table(
        {
            "meter": pa.array([r[0] for r in rows], pa.string()),
            "customer_id": pa.array([r[1] for r in rows], pa.string()),
            "window_start": pa.array([r[2] // 1000 for r in rows], pa.timestamp("s", tz="UTC")),
            "version": pa.array([r[3] for r in rows], pa.timestamp("ns", tz="UTC")),
        },
        schema=_NAMES,
    )
