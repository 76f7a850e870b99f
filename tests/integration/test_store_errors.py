"""ClickHouse failures by kind (consumer/store/errors.py): what a retry heals pauses and
retries; a statement the store refuses stops the process with its code and its first
line. The errors are real ones, provoked from chDB and, for the server backend, through
clickhouse-connect against the ClickHouse HTTP endpoint over chDB."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from consumer.app import build_pipeline
from consumer.clock import SystemClock
from consumer.emitter.plan.outbox import SENT
from consumer.local.broker import TansuBroker
from consumer.local.emulator import EmulatorServer
from consumer.metrics import Metrics
from consumer.ops.health import Health
from consumer.store import open_store
from consumer.store.backend import Backend, StoreBug, StoreUnavailable
from consumer.store.chdb import ChdbBackend
from consumer.store.errors import BUG, TRANSIENT
from consumer.store.server import ServerBackend
from tests.integration.conftest import ServerUnderTest, produce_sample
from tests.integration.store_wrap import Passthrough

pytestmark = pytest.mark.integration

REFUSED = [  # (statement, what ClickHouse answers): each a real error of its kind
    ("SELEC 1", "code 62 SYNTAX_ERROR"),
    ("SELECT nope FROM t", "code 47 UNKNOWN_IDENTIFIER"),
    ("SELECT * FROM nope", "code 60 UNKNOWN_TABLE"),
    ("SELECT sum('a')", "code 43 ILLEGAL_TYPE_OF_ARGUMENT"),
    ("SELECT arrayMap(x -> x, 1)", "code 43 ILLEGAL_TYPE_OF_ARGUMENT"),
    ("SELECT {x:UInt8}", "code 456 UNKNOWN_QUERY_PARAMETER"),
    ("SELECT throwIf(1)", "code 395 FUNCTION_THROW_IF_VALUE_IS_NON_ZERO"),  # in no list
]
HEALS = [
    ("SELECT count() FROM numbers(1000000) GROUP BY number SETTINGS max_memory_usage = 1000",
     241),
    ("SELECT count() FROM numbers(1000000000000) SETTINGS max_execution_time = 0.05", 159),
]  # fmt: skip


@pytest.fixture
def chdb(tmp_path: Path) -> Iterator[ChdbBackend]:
    store = ChdbBackend(tmp_path / "chdb", "errors")
    store.command("CREATE TABLE IF NOT EXISTS t (a UInt32) ENGINE = MergeTree ORDER BY a")
    yield store
    store.close()


def test_the_codes_are_clickhouse_s(chdb: ChdbBackend) -> None:
    """Each name and code of the two lists is the engine's own (system.errors)."""
    rows = chdb.query(
        "SELECT code, name FROM system.errors SETTINGS system_events_show_zero_values = 1"
    )
    known: dict[int, str] = dict(rows)
    assert {c: known.get(c) for c in TRANSIENT} == TRANSIENT
    assert {c: known.get(c) for c in BUG} == BUG
    assert not TRANSIENT.keys() & BUG.keys()


@pytest.mark.parametrize(("sql", "kind"), REFUSED)
def test_chdb_refusals_are_bugs_with_their_code_and_statement(
    chdb: ChdbBackend, sql: str, kind: str
) -> None:
    with pytest.raises(StoreBug) as e:
        chdb.query(f"{sql}\n-- a second line never shows")
    assert str(e.value).startswith(f"{sql!r} failed ({kind}), which a retry cannot fix: Code: ")
    assert "\n" not in str(e.value) and "second line" not in str(e.value)
    assert e.value.code == int(kind.split()[1])


@pytest.mark.parametrize(("sql", "code"), HEALS, ids=["memory", "timeout"])
def test_chdb_capacity_and_time_failures_are_transient(
    chdb: ChdbBackend, sql: str, code: int
) -> None:
    with pytest.raises(StoreUnavailable) as e:
        chdb.query(sql)
    assert e.value.code == code


def test_chdb_inserts_and_inputs_name_their_statement(chdb: ChdbBackend) -> None:
    with pytest.raises(StoreBug, match=r"^'INSERT INTO nope \(a\) SELECT \* FROM Python"):
        chdb.insert_columns("nope", {"a": pa.array([1], pa.uint32())})
    keys = pa.table({"k": pa.array([1], pa.uint32())})
    with pytest.raises(StoreBug, match=r"^'SELECT z FROM Python\(_in0\)' failed \(code 47 "):
        chdb.query_with("SELECT z FROM $keys", {"keys": keys})


def _server(s: ServerUnderTest, database: str) -> ServerBackend:
    c = s.clickhouse
    return ServerBackend(c["host"], c["port"], c["username"], c["password"], database)


def test_server_backend_classifies_by_the_server_s_code(
    clickhouse_server: ServerUnderTest, unique: str
) -> None:
    store = _server(clickhouse_server, f"e{unique}")
    try:
        store.command("CREATE TABLE IF NOT EXISTS t (a UInt32) ENGINE = MergeTree ORDER BY a")
        for sql, kind in REFUSED[:3]:
            with pytest.raises(StoreBug) as e:
                store.query(sql)
            assert str(e.value).startswith(f"{sql!r} failed ({kind}), which a retry cannot fix")
        with pytest.raises(StoreBug, match=r"^'INSERT INTO nope \(a\)' failed \(code 60 "):
            store.insert_columns("nope", {"a": pa.array([1], pa.uint32())})
        for sql, code in HEALS:
            with pytest.raises(StoreUnavailable) as u:
                store.command(sql)
            assert u.value.code == code
    finally:
        store.close()


class _Gateway(BaseHTTPRequestHandler):
    """A proxy in front of a ClickHouse that is away: 503, no ClickHouse code."""

    def do_GET(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


def test_server_backend_without_an_answer_is_transient() -> None:
    gateway = ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    threading.Thread(target=gateway.serve_forever, daemon=True).start()
    try:
        with pytest.raises(StoreUnavailable, match="503"):
            ServerBackend("127.0.0.1", gateway.server_address[1], "default", "pw-9x", "d")
    finally:
        gateway.shutdown()
        gateway.server_close()
    port = gateway.server_address[1]  # closed now: nothing listens
    with pytest.raises(StoreUnavailable, match="Connection refused") as e:
        ServerBackend("127.0.0.1", port, "default", "pw-9x", "d")
    assert "pw-9x" not in str(e.value)


# -- the catch sites: a refused statement stops the process, wherever it runs -------------


class Refusing(Passthrough):
    """Runs the chosen statement against a table that does not exist, so the real store
    refuses it (UNKNOWN_TABLE). A second refusal means the first was retried: the run is
    stopped then, so a retried bug ends the test instead of hanging it."""

    def __init__(self, inner: Backend, table: str, stop: threading.Event, marks: bool) -> None:
        super().__init__(inner)
        self.table, self.stop, self.marks = table, stop, marks
        self.refused = 0

    def _refuse(self, table: str, columns: Mapping[str, pa.Array] | None = None) -> bool:
        if table != self.table:
            return False
        if self.marks and (columns is None or set(columns["status_rank"].to_pylist()) != {SENT}):
            return False
        self.refused += 1
        if self.refused > 1:
            self.stop.set()
        return True

    def insert_columns(self, table: str, columns: Mapping[str, pa.Array], token: str = "") -> None:
        if self._refuse(table, columns):
            table = f"{table}_refused"
        self.inner.insert_columns(table, columns, token)

    def command_with(
        self, sql: str, inputs: Mapping[str, pa.Table], params: Mapping[str, Any] | None = None
    ) -> None:
        if f"INSERT INTO {self.table}" in sql and self._refuse(self.table):
            sql = sql.replace(f"INSERT INTO {self.table}", f"INSERT INTO {self.table}_refused")
        self.inner.command_with(sql, inputs, params)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize(
    ("stage", "table", "marks"),
    [
        ("ingest", "usage_events", False),  # the consume loop's range write
        ("rollup", "usage_windows", False),  # the rollup thread's window recompute
        ("emitter", "stripe_pushes", False),  # the emitter thread's plan
        ("marks", "stripe_pushes", True),  # the emitter's delivery marks
    ],
)
def test_a_refused_statement_stops_the_process(
    broker: TansuBroker,
    emulator: EmulatorServer,
    tmp_path: Path,
    unique: str,
    stage: str,
    table: str,
    marks: bool,
) -> None:
    run = produce_sample(broker, emulator, tmp_path, f"{stage}{unique}", 200, 3, seed=5)
    clock = SystemClock()
    stop = threading.Event()
    store = Refusing(open_store(run.settings.clickhouse), table, stop, marks)
    ended: list[BaseException | None] = []

    def process() -> None:
        try:
            build_pipeline(run.settings, clock, Metrics(), Health(clock), store).run(stop)
            ended.append(None)
        except BaseException as exc:
            ended.append(exc)

    runner = threading.Thread(target=process, daemon=True)
    runner.start()
    # A bound, not a timing: the refusal comes within seconds; a retried one never ends
    # (the rollup's close waits for its job forever), so the test ends instead.
    runner.join(120)
    stop.set()
    assert ended, f"the process never stopped: the refused statement was retried {store.refused}x"
    store.close()
    assert store.refused == 1  # stopped at the first refusal: never retried
    assert isinstance(ended[0], StoreBug), ended[0]  # `except StoreError` still catches it
    assert f"'INSERT INTO {table}_refused" in str(ended[0])
    assert "(code 60 UNKNOWN_TABLE), which a retry cannot fix" in str(ended[0])
