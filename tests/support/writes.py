"""Writing chosen events through the sinks one step after another, as tests need: the run
path writes the ledger and the outputs at once and recomputes windows on the rollup thread
(consumer/intent/commit.py, consumer/sinks/rollup.py)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pyarrow as pa

from consumer.classify.classifier import Accepted, AcceptedBatch, per_event_meters
from consumer.decode.columns import LEDGER_SCHEMA, PROPERTIES, VER_BASE
from consumer.records import DECIMAL, TIME_MS
from consumer.sinks.ledger import RangeWrite, write_ledger, write_outputs
from consumer.sinks.rollup import Cancel, recompute, touched_windows
from consumer.store.backend import Backend


def accepted_batch(accepted: Sequence[Accepted]) -> AcceptedBatch:
    """An accepted batch built from event objects."""
    a = list(accepted)
    ts = [x.record.timestamp_ms for x in a]
    table = pa.table(
        {
            "meter": pa.array([x.meter.name for x in a], pa.string()),
            "customer_id": pa.array([x.event.customer_id for x in a], pa.string()),
            "event_id": pa.array([x.event.event_id for x in a], pa.string()),
            "event_time": pa.array([x.event.timestamp_ms for x in a], TIME_MS),
            "value": pa.array([x.event.value for x in a], DECIMAL),
            "properties": pa.array([list(x.event.properties.items()) for x in a], PROPERTIES),
            "schema_id": pa.array([x.event.schema_id for x in a], pa.uint32()),
            "topic": pa.array([x.record.topic for x in a], pa.string()),
            "partition": pa.array([x.record.partition for x in a], pa.uint32()),
            "offset": pa.array([x.record.offset for x in a], pa.uint64()),
            "record_time": pa.array(ts, TIME_MS),
            "ver": pa.array([VER_BASE - t for t in ts], pa.uint64()),
            "topic_id": pa.array([""] * len(a), pa.string()),
        },
        schema=LEDGER_SCHEMA,
    )
    per_event = per_event_meters([x.meter for x in a])
    counts = dict(Counter(x.meter.name for x in a))
    return AcceptedBatch(table, counts, per_event, lambda: a)


def write_effects(store: Backend, token: str, ranges: Sequence[RangeWrite], now_ms: int) -> int:
    """Every effect of the batch but its windows, one write after another; returns how many
    events were accepted."""
    n = write_ledger(store, token, ranges)
    write_outputs(store, token, ranges, now_ms)
    return n


def recompute_windows(store: Backend, accepted: pa.Table, cancels: Sequence[Cancel] = ()) -> None:
    """Upsert every minute window the accepted events (ledger columns) touched, and those
    of the events `cancels` takes back."""
    recompute(store, touched_windows(accepted), cancels)
