"""What the ClickHouse edge tests look at: the store's own tables and system tables, an
outage switch and a part-count probe wrapped around a real backend, and an in-process
pipeline with its HTTP endpoints."""

from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pyarrow as pa
from confluent_kafka import Consumer, TopicPartition

from consumer.app import Pipeline, build_pipeline
from consumer.clock import SystemClock
from consumer.config import Settings
from consumer.local.sample import Message
from consumer.metrics import Metrics
from consumer.ops import health as health_http
from consumer.ops.health import Health
from consumer.producer import UsageProducer
from consumer.store.backend import Backend, StoreUnavailable
from tests.integration.conftest import wait_for
from tests.integration.store_wrap import Passthrough

WindowRow = tuple[Decimal, int, Decimal, Decimal, Decimal, int, Decimal, int]
WindowKey = tuple[str, str, int]  # (meter, customer, window start in epoch seconds)


# -- ClickHouse's own view of the store ---------------------------------------------------
def merge_tree_setting(store: Backend, name: str) -> int:
    """The server's value of a MergeTree setting (system.merge_tree_settings)."""
    rows = store.query(
        "SELECT value FROM system.merge_tree_settings WHERE name = {n:String}", {"n": name}
    )
    return int(rows[0][0])


def table_setting(store: Backend, table: str, name: str) -> int | None:
    """A setting a table was created or altered with, None when it has the default."""
    rows = store.query(
        "SELECT engine_full FROM system.tables "
        "WHERE database = currentDatabase() AND name = {t:String}",
        {"t": table},
    )
    found = re.search(rf"\b{name} = (\d+)", str(rows[0][0]))
    return int(found.group(1)) if found else None


def active_parts(store: Backend, table: str | None = None) -> dict[tuple[str, str], int]:
    """Active parts per (table, partition): what parts_to_throw_insert is checked against."""
    rows = store.query(
        """SELECT table, partition_id, count() FROM system.parts
           WHERE database = currentDatabase() AND active
             AND ({t:String} = '' OR table = {t:String})
           GROUP BY table, partition_id""",
        {"t": table or ""},
    )
    return {(str(t), str(p)): int(n) for t, p, n in rows}


@dataclass(frozen=True)
class RangeRows:
    """One range of ingest_state, its attempts, and the ledger rows from its offsets."""

    partition: int
    start: int
    end: int
    attempts: int
    done: bool
    intents: int  # intent rows: one per formation, one more per withdrawn attempt
    reforms: int  # formations after a crash (attempt 2 and up; a withdrawal writes 1 less)
    rows: int  # distinct ledger rows (FINAL)
    physical: int  # physical ledger rows: more than `rows` when a write landed again
    windows: int  # distinct minute windows its rows touch
    # Of `rows`, events another partition also wrote (a cross-partition duplicate): when
    # both copies were in one insert, ClickHouse kept one of them at insert time
    # (optimize_on_insert), so such a row may have one physical copy per write, or none.
    shared: int

    @property
    def written_again(self) -> int:
        return self.physical - self.rows


def ranges(store: Backend, group: str, topic: str) -> list[RangeRows]:
    states = store.query(
        """SELECT partition, range_start, range_end, max(attempt), max(state_rank) = 2,
                  countIf(state_rank = 1), countIf(state_rank = 1 AND attempt >= 2)
           FROM ingest_state WHERE group_id = {g:String} AND topic = {t:String}
           GROUP BY partition, range_start, range_end
           ORDER BY partition, range_start""",
        {"g": group, "t": topic},
    )
    out = []
    for p, a, b, attempts, done, intents, reforms in states:
        bounds = {"t": topic, "p": int(p), "a": int(a), "b": int(b)}
        where = """topic = {t:String} AND partition = {p:UInt32}
                   AND offset >= {a:UInt64} AND offset < {b:UInt64}"""
        final = store.query(
            f"""SELECT count(), uniqExact(meter, customer_id, toStartOfMinute(event_time))
                FROM usage_events FINAL WHERE {where}""",
            bounds,
        )[0]
        physical = store.query(f"SELECT count() FROM usage_events WHERE {where}", bounds)[0][0]
        shared = store.query(
            f"""SELECT count() FROM usage_events FINAL
                WHERE {where} AND (meter, customer_id, event_id) IN (
                    SELECT meter, customer_id, event_id FROM usage_events WHERE NOT ({where}))""",
            bounds,
        )[0][0]
        out.append(
            RangeRows(
                int(p),
                int(a),
                int(b),
                int(attempts),
                bool(done),
                int(intents),
                int(reforms),
                int(final[0]),
                int(physical),
                int(final[1]),
                int(shared),
            )
        )
    return out


def window_rows(store: Backend) -> dict[WindowKey, WindowRow]:
    """usage_windows as it reads (FINAL), without the computed_at stamp or the zero rows
    of windows whose events were all cancelled."""
    rows = store.query(
        """SELECT meter, customer_id, toUnixTimestamp(window_start),
                  toString(sum_value), event_count, toString(min_value), toString(max_value),
                  toString(first_value), toUnixTimestamp64Milli(first_time),
                  toString(last_value), toUnixTimestamp64Milli(last_time)
           FROM usage_windows FINAL WHERE event_count > 0"""
    )
    return {
        (str(m), str(c), int(w)): (
            Decimal(s),
            int(n),
            Decimal(lo),
            Decimal(hi),
            Decimal(first),
            int(first_t),
            Decimal(last),
            int(last_t),
        )
        for m, c, w, s, n, lo, hi, first, first_t, last, last_t in rows
    }


def windows_from_ledger(store: Backend) -> dict[WindowKey, WindowRow]:
    """Every minute window recomputed here, in Python, from the deduplicated ledger
    without the cancelled events."""
    rows = store.query(
        """SELECT meter, customer_id, event_id, toUnixTimestamp64Milli(event_time),
                  toString(value)
           FROM usage_events FINAL
           WHERE (meter, customer_id, event_id) NOT IN (
                    SELECT meter, customer_id, cancelled_id FROM cancellations)"""
    )
    events: dict[WindowKey, list[tuple[int, str, Decimal]]] = {}
    for m, c, e, ts, v in rows:
        key = (str(m), str(c), int(ts) // 60_000 * 60)
        events.setdefault(key, []).append((int(ts), str(e), Decimal(v)))
    out: dict[WindowKey, WindowRow] = {}
    for key, evs in events.items():
        evs.sort()
        values = [v for _, _, v in evs]
        out[key] = (
            sum(values, Decimal(0)),
            len(values),
            min(values),
            max(values),
            evs[0][2],
            evs[0][0],
            evs[-1][2],
            evs[-1][0],
        )
    return out


def window_mismatches(store: Backend) -> list[str]:
    """Where usage_windows differs from a recomputation from the ledger (first few)."""
    got, want = window_rows(store), windows_from_ledger(store)
    bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    return [f"{k}: windows={got.get(k)} ledger={want.get(k)}" for k in bad[:5]] + (
        [f"... {len(bad)} windows differ"] if len(bad) > 5 else []
    )


# -- wrappers around a real backend -------------------------------------------------------
def _inserted_table(sql: str) -> str | None:
    found = re.match(r"\s*INSERT\s+INTO\s+(\w+)", sql, re.IGNORECASE)
    return found.group(1) if found else None


class OutageStore(Passthrough):
    """A real backend that fails every call while `down` is set, like an unreachable server,
    and counts the ingest-state reads it failed (a partition being assigned)."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.down = threading.Event()
        self.failed = 0
        self.failed_state_reads = 0
        self._lock = threading.Lock()

    def check(self, text: str) -> None:
        if not self.down.is_set():
            return
        with self._lock:
            self.failed += 1
            if "FROM ingest_state" in text or "FROM ingest_latest" in text:
                self.failed_state_reads += 1
        raise StoreUnavailable("injected outage: ClickHouse unreachable")


class PartsWatch(Passthrough):
    """A real backend that counts inserts per table, and a thread that reads the active
    parts of every table's partitions every `interval` seconds while the run goes on."""

    def __init__(self, inner: Backend, interval: float = 0.2) -> None:
        super().__init__(inner)
        self.inserts: dict[str, int] = {}
        self.peak: dict[tuple[str, str], int] = {}
        self.samples = 0
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="parts-watch", daemon=True)

    def start(self) -> PartsWatch:
        self._thread.start()
        return self

    def sample(self) -> dict[tuple[str, str], int]:
        now = active_parts(self.inner)
        self.samples += 1
        for key, n in now.items():
            self.peak[key] = max(self.peak.get(key, 0), n)
        return now

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _count(self, table: str | None) -> None:
        if table is not None:
            self.inserts[table] = self.inserts.get(table, 0) + 1

    def command(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self.inner.command(sql, params)
        self._count(_inserted_table(sql))

    def command_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> None:
        self.inner.command_with(sql, inputs, params)
        self._count(_inserted_table(sql))

    def insert_columns(self, table: str, columns: Mapping[str, pa.Array], token: str = "") -> None:
        self.inner.insert_columns(table, columns, token)
        if len(next(iter(columns.values()), [])):
            self._count(table)


# -- an in-process consumer with its endpoints --------------------------------------------
class Running:
    """`usage-consumer run` in a thread of this process, with /metrics, /healthz and /readyz
    on a free port; the store is handed in and stays open after `stop()`."""

    def __init__(self, settings: Settings, store: Backend) -> None:
        clock = SystemClock()
        self.metrics = Metrics()
        self.health = Health(clock, settings.pipeline.stall_seconds)
        self.server, self.port = health_http.serve("127.0.0.1", 0, self.metrics, self.health)
        self.pipeline: Pipeline = build_pipeline(settings, clock, self.metrics, self.health, store)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pipeline")
        self.crashed: BaseException | None = None

    def _run(self) -> None:
        try:
            self.pipeline.run(self._stop)
        except BaseException as exc:
            self.crashed = exc
            raise

    def start(self) -> Running:
        self.thread.start()
        return self

    def alive(self) -> bool:
        return self.thread.is_alive()

    def committed_all(self, ends: Mapping[int, int]) -> bool:
        committed = self.pipeline.ingestor.committed
        return all(committed.get(p, -1) >= end for p, end in ends.items())

    def wait_drained(self, ends: Mapping[int, int], timeout: float = 180) -> None:
        """Every offset in `ends` committed, then an emitter cycle that found nothing to do."""
        deadline = time.monotonic() + timeout
        wait_for(
            lambda: self.committed_all(ends) or not self.alive(),
            "offsets committed",
            timeout,
        )
        assert self.alive(), f"the consumer stopped: {self.crashed!r}"
        emitter = self.pipeline.emitter
        assert emitter is not None
        mark = emitter.cycles
        wait_for(
            lambda: emitter.drained_since(mark),
            "outbox drained",
            max(1.0, deadline - time.monotonic()),
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str) -> float:
        """Sum of a metric's samples (all labels) as /metrics serves it."""
        _, text = self.get("/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=120)
        self.server.shutdown()
        self.server.server_close()


def produce_steadily(
    messages: Sequence[Message], bootstrap: str, topic: str, per_second: float
) -> dict[int, int]:
    """Produce at a steady rate through one producer; returns each partition's end offset."""
    ends: dict[int, int] = {}
    failures: list[str] = []

    def delivered(err: object, msg: Any) -> None:
        if err is not None:
            failures.append(str(err))
            return
        ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

    producer = UsageProducer({"bootstrap.servers": bootstrap}, topic)
    chunk = max(1, int(per_second // 10))
    started = time.monotonic()
    for i in range(0, len(messages), chunk):
        for m in messages[i : i + chunk]:
            producer.send_raw(m.key, m.value, partition=m.partition, on_delivery=delivered)
        if producer.flush(30) or failures:
            raise RuntimeError(f"produce failed: {failures[:3]}")
        time.sleep(max(0.0, started + (i + chunk) / per_second - time.monotonic()))
    return ends


def group_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets, read by a client outside the group."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        c.close()
    return {int(tp.partition): int(tp.offset) for tp in got}


def commit_group_offsets(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    """Commit offsets for a group that has no members (an operator's or a tool's commit)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        c.commit(
            offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False
        )
    finally:
        c.close()
