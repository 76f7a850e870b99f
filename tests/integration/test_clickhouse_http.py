"""The ClickHouse HTTP endpoint over chDB (tests/support/clickhouse_http.py) as
clickhouse-connect and the server backend use it: server-side parameters, insert formats and
encodings, the insert dedup token (and settings that stay with their request), external
tables, FINAL, errors, and several threads and processes on one store at once."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import clickhouse_connect
import pyarrow as pa
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from consumer.records import DECIMAL, TIME_MS
from consumer.store import StoreError
from consumer.store.server import ServerBackend
from tests.integration.conftest import CLICKHOUSE_PASSWORD, server_config
from tests.support.clickhouse_http import Endpoint, running

pytestmark = pytest.mark.integration

BLOCK = 50  # rows an insert in the concurrency tests
DEDUP_TABLE = "CREATE TABLE {t} (k UInt64, v String) ENGINE = MergeTree ORDER BY k SETTINGS non_replicated_deduplication_window = 1000"  # noqa: E501


def backend(cfg: dict[str, Any]) -> ServerBackend:
    return ServerBackend(
        cfg["host"], cfg["port"], cfg["username"], cfg["password"], cfg["database"]
    )


@pytest.fixture
def cfg(clickhouse_http: Endpoint, unique: str) -> dict[str, Any]:
    """The server backend's settings, a database of the test's own."""
    return server_config(clickhouse_http.host, clickhouse_http.port, database=f"c{unique}")


@pytest.fixture
def store(cfg: dict[str, Any]) -> Iterator[ServerBackend]:
    b = backend(cfg)
    yield b
    b.close()


def client(cfg: dict[str, Any], **options: Any) -> Any:
    """A plain clickhouse-connect client, with a session as its defaults make one."""
    return clickhouse_connect.get_client(
        host=cfg["host"],
        port=cfg["port"],
        username=cfg["username"],
        password=cfg["password"],
        database=cfg["database"],
        **options,
    )


@pytest.mark.parametrize(
    ("ch_type", "value"),
    [
        ("String", "it's a \\ backslash, a tab\t, a newline\n, '' quotes, üñí 日本 and \\'"),
        ("String", ""),
        ("UInt64", 2**64 - 1),
        ("Int64", -(2**63)),
        ("DateTime64(3)", datetime(2026, 12, 3, 4, 5, 6, 789000)),
        ("Array(String)", ["a'b", "c\\d", "", "ü\t"]),
        ("Decimal(38, 9)", Decimal("-12345678901234567890123456789.000000001")),
        # too long for the URL: clickhouse-connect sends query and parameters as a form
        ("Array(String)", [f"cus_{i}'\\" for i in range(600)]),
    ],
    ids=["text", "empty", "uint64", "int64", "datetime64", "array", "decimal", "form"],
)
def test_server_side_parameters_round_trip(store: ServerBackend, ch_type: str, value: Any) -> None:
    assert store.query(f"SELECT {{v:{ch_type}}}, toTypeName({{v:{ch_type}}})", {"v": value}) == [
        (value, ch_type)
    ]
    store.command(f"CREATE TABLE p (v {ch_type}) ENGINE = MergeTree ORDER BY tuple()")
    store.command(f"INSERT INTO p SELECT {{v:{ch_type}}}", {"v": value})
    assert store.query(f"SELECT count() FROM p WHERE v = {{v:{ch_type}}}", {"v": value}) == [(1,)]


def test_dedup_token_lands_once_and_never_reaches_a_later_insert(store: ServerBackend) -> None:
    store.command(DEDUP_TABLE.format(t="d"))
    block = {"k": pa.array([1, 2], pa.uint64()), "v": pa.array(["a", "b"])}
    store.insert_columns("d", block, token="tok")
    store.insert_columns("d", block, token="tok")
    assert store.query("SELECT count() FROM d") == [(2,)]
    # Had "tok" stayed on the store, this other block would be dropped as its duplicate.
    store.insert_columns("d", {"k": pa.array([3], pa.uint64()), "v": pa.array(["c"])})
    assert store.query("SELECT k, v FROM d ORDER BY k") == [(1, "a"), (2, "b"), (3, "c")]


def test_url_settings_apply_to_their_request_only(
    cfg: dict[str, Any], store: ServerBackend
) -> None:
    c = client(cfg)
    sql = "SELECT getSetting('insert_deduplication_token'), getSetting('optimize_on_insert')"
    assert c.query(sql, settings={"insert_deduplication_token": "x"}).result_rows == [("x", True)]
    assert c.query(sql).result_rows == [("", True)]
    assert store.query(sql) == [("", False)]  # the backend's client-wide optimize_on_insert=0
    assert c.query(sql).result_rows == [("", True)]


def test_inserts_in_every_encoding_clickhouse_connect_sends(
    cfg: dict[str, Any], store: ServerBackend
) -> None:
    rows = [
        (i, f"it's \\{i}", Decimal(i) / 4, datetime(2026, 1, 1, 0, 0, i % 60)) for i in range(3000)
    ]
    columns = ["k", "s", "d", "t"]
    arrow = pa.table(
        {
            "k": pa.array([r[0] for r in rows], pa.uint64()),
            "s": pa.array([r[1] for r in rows]),
            "d": pa.array([r[2] for r in rows], DECIMAL),
            "t": pa.array([r[3] for r in rows], pa.timestamp("ms")),
        }
    )
    for compress in (False, "lz4", "zstd", "gzip"):
        c = client(cfg, compress=compress)
        for how in ("native", "arrow"):
            table = f"e_{compress}_{how}"
            c.command(
                f"CREATE TABLE {table} (k UInt64, s String, d Decimal(38, 9), t DateTime64(3)) "
                "ENGINE = MergeTree ORDER BY k"
            )
            if how == "native":  # a chunked body, compressed block by block
                c.insert(table, rows, column_names=columns)
            else:  # the query and the Arrow file in one body
                c.insert_arrow(table, arrow)
            got = c.query(f"SELECT k, s, d, t FROM {table} ORDER BY k").result_rows
            assert got == rows, (compress, how)


def test_query_with_reads_external_tables_of_every_input_type(store: ServerBackend) -> None:
    keys = pa.table(
        {
            "k": pa.array(["a", "b", "it's"]),
            "n": pa.array([1, 2, 3], pa.uint32()),
            "i": pa.array([-(2**63), 0, 2**63 - 1], pa.int64()),
            "t": pa.array([1_700_000_000_123, 0, 1], TIME_MS),
            "m": pa.array([[("x", "1")], [], [("y", "\\")]], pa.map_(pa.string(), pa.string())),
        }
    )
    tiny = Decimal("-0.000000001")
    vals = pa.table({"k": pa.array(["a", "it's"]), "v": pa.array([Decimal("1.5"), tiny], DECIMAL)})
    store.command("CREATE TABLE x (k String, v Decimal(38, 9)) ENGINE = MergeTree ORDER BY k")
    store.command_with("INSERT INTO x SELECT k, v FROM $vals", {"vals": vals})
    rows = store.query_with(
        """SELECT k.k, k.n, k.i, toUnixTimestamp64Milli(k.t), k.m, toString(x.v), toString(w.v)
           FROM $keys AS k LEFT JOIN x ON x.k = k.k LEFT JOIN $vals AS w ON w.k = k.k
           WHERE k.n >= {least:UInt32} ORDER BY k.n""",
        {"keys": keys, "vals": vals},
        {"least": 1},
    )
    assert rows == [
        ("a", 1, -(2**63), 1_700_000_000_123, {"x": "1"}, "1.5", "1.5"),
        ("b", 2, 0, 0, {}, "0", "0"),
        ("it's", 3, 2**63 - 1, 1, {"y": "\\"}, "-0.000000001", "-0.000000001"),
    ]
    assert store.query("SELECT count() FROM system.tables WHERE name IN ('keys', 'vals')") == [
        (0,)
    ]  # the external tables lived for their request only


def test_parameters_larger_than_a_request_line_reach_every_call(store: ServerBackend) -> None:
    """A bind parameter past the 64 KiB request line the endpoint (and many proxies) allow:
    each call moves it into the body rather than the URL (HTTP 414 otherwise)."""
    ids = [f"evt_{i:07d}_{'x' * 56}" for i in range(2_000)]  # about 140 KB
    keep = pa.table({"k": pa.array(ids[::2])})
    store.command("CREATE TABLE big (k String) ENGINE = MergeTree ORDER BY k")
    store.command("INSERT INTO big SELECT arrayJoin({ids:Array(String)})", {"ids": ids})
    store.command_with(
        "INSERT INTO big SELECT k FROM $keep WHERE k IN {ids:Array(String)}",
        {"keep": keep},
        {"ids": ids},
    )
    assert store.query("SELECT count() FROM big WHERE k IN {ids:Array(String)}", {"ids": ids}) == [
        (3_000,)
    ]
    rows = store.query_with(
        "SELECT count() FROM $keep WHERE k NOT IN {ids:Array(String)}", {"keep": keep}, {"ids": ids}
    )
    assert rows == [(0,)]
    store.command(
        "ALTER TABLE big DELETE WHERE k IN {ids:Array(String)} SETTINGS mutations_sync = 1",
        {"ids": ids[:1_000]},
    )
    assert store.query("SELECT count() FROM big") == [(1_500,)]


def test_final_reads_the_last_row_of_each_key(store: ServerBackend) -> None:
    store.command("CREATE TABLE r (k String, v UInt64) ENGINE = ReplacingMergeTree ORDER BY k")
    store.insert_columns("r", {"k": pa.array(["a", "b"]), "v": pa.array([1, 1], pa.uint64())})
    store.insert_columns("r", {"k": pa.array(["a"]), "v": pa.array([2], pa.uint64())})
    assert store.query("SELECT k, v FROM r FINAL ORDER BY k") == [("a", 2), ("b", 1)]


def test_each_client_reads_its_own_database(clickhouse_http: Endpoint, unique: str) -> None:
    one, two = (
        backend(server_config(clickhouse_http.host, clickhouse_http.port, f"{unique}_{n}"))
        for n in (1, 2)
    )
    for b, v in ((one, "one"), (two, "two")):
        b.command("CREATE TABLE same (v String) ENGINE = MergeTree ORDER BY v")
        b.insert_columns("same", {"v": pa.array([v])})
    assert (one.query("SELECT v FROM same"), two.query("SELECT v FROM same")) == (
        [("one",)],
        [("two",)],
    )


def test_errors_carry_the_code_never_the_password(
    cfg: dict[str, Any], store: ServerBackend
) -> None:
    cases = [
        ("SELECT * FROM no_such_table", {}, 60),  # UNKNOWN_TABLE
        ("SELEC 1 FRM", {}, 62),  # SYNTAX_ERROR
        ("SELECT {v:UInt8}", {"v": "x"}, 457),  # BAD_QUERY_PARAMETER
    ]
    for sql, params, code in cases:
        with pytest.raises(StoreError) as e:
            store.query(sql, params)
        assert f"Code: {code}. DB::Exception:" in str(e.value)
        assert CLICKHOUSE_PASSWORD not in str(e.value)
        with pytest.raises(DatabaseError) as raw:
            client(cfg).query(sql, parameters=params)
        assert raw.value.code == code
    with pytest.raises(StoreError) as e:
        store.insert_columns("no_such_table", {"k": pa.array([1])})
    assert "Code: 60." in str(e.value)


def test_threads_sharing_a_store_see_whole_inserts_in_order(store: ServerBackend) -> None:
    store.command(DEDUP_TABLE.format(t="c"))
    seen: dict[int, list[int]] = {}

    def write(who: int) -> None:
        seen[who] = insert_and_count(store, "c", who, 10)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.query("SELECT count(), uniqExact(k) FROM c") == [(4 * 10 * BLOCK,) * 2]
    assert_consistent(seen, 10)


def test_two_processes_share_one_store(cfg: dict[str, Any], store: ServerBackend) -> None:
    store.command(DEDUP_TABLE.format(t="mp"))
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {w: pool.submit(process_writer, cfg, w, 15) for w in range(2)}
        seen = {w: f.result(timeout=120) for w, f in futures.items()}
    assert store.query("SELECT count(), uniqExact(k) FROM mp") == [(2 * 15 * BLOCK,) * 2]
    assert_consistent(seen, 15)


def test_the_store_outlives_the_endpoint(tmp_path: Path) -> None:
    """Stopped, the endpoint lets go of the store; a new one serves what the first wrote."""
    for expected in ([(0,)], [(1,)]):
        with running(tmp_path / "store") as endpoint:
            store = backend(server_config(endpoint.host, endpoint.port))
            store.command("CREATE TABLE IF NOT EXISTS kept (v UInt8) ENGINE = MergeTree ORDER BY v")
            assert store.query("SELECT count() FROM kept") == expected
            store.insert_columns("kept", {"v": pa.array([1], pa.uint8())})
            store.close()


def insert_and_count(store: ServerBackend, table: str, who: int, blocks: int) -> list[int]:
    """Insert `blocks` blocks of BLOCK rows, each twice with its token (a retry), and count
    the table's rows after each."""
    counts = []
    for i in range(blocks):
        start = (who * blocks + i) * BLOCK
        block = {
            "k": pa.array(range(start, start + BLOCK), pa.uint64()),
            "v": pa.array([f"{who}"] * BLOCK),
        }
        for _ in range(2):
            store.insert_columns(table, block, token=f"{who}-{i}")
        counts.append(int(store.query(f"SELECT count() FROM {table}")[0][0]))
    return counts


def process_writer(cfg: dict[str, Any], who: int, blocks: int) -> list[int]:
    """insert_and_count in a process of its own, with a backend of its own."""
    store = backend(cfg)
    try:
        return insert_and_count(store, "mp", who, blocks)
    finally:
        store.close()


def assert_consistent(seen: dict[int, list[int]], blocks: int) -> None:
    """Every writer saw whole blocks, never fewer than before, and at least its own."""
    for counts in seen.values():
        assert all(n % BLOCK == 0 for n in counts), counts
        assert counts == sorted(counts), counts
        assert all(n >= (i + 1) * BLOCK for i, n in enumerate(counts)), counts
    assert max(c[-1] for c in seen.values()) == len(seen) * blocks * BLOCK
