"""ClickHouse's HTTP interface over one chDB store, for tests: what clickhouse-connect needs
for what `consumer/store/server.py` does, so the server backend runs against the real
ClickHouse engine where no ClickHouse server can be installed.

    python -m tests.support.clickhouse_http --path DIR [--port 0] [--user U --password P]

prints its port on a line once it listens; several processes then share one store through
it (chDB lets one process open a store). In tests, `running(path)` starts and stops it.

Each request is sessionless, as on a server: it runs on a chDB connection of its own,
closed after it, so its URL settings (`insert_deduplication_token`, ...), its `database`
and its external tables never reach another request. Statements run one at a time (one
lock). Served: `/ping`; a query from the `query` parameter, the body or both (joined by a
newline, as ClickHouse does), with `param_<name>` values parsed by ClickHouse itself;
`INSERT ... FORMAT <fmt>` followed by its data in any input format (Arrow, Native,
RowBinary, ...); multipart external tables (`<name>_format`, `<name>_structure` or
`<name>_types`); chunked bodies; gzip, deflate, zstd and lz4 `Content-Encoding`; one user
and password. Errors answer with `X-ClickHouse-Exception-Code` and ClickHouse's
`Code: N. DB::Exception: ...` body. Not served: sessions (`session_id` is ignored), the
`compress`/`decompress` block format, compressed responses, TLS, users and grants, URLs
over 64 KiB (http.server's limit; a server takes 1 MiB).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import lz4.frame
from backports import zstd

from consumer.local.broker import die_with_parent
from consumer.store.backend import quote_identifier

# Parameters of ClickHouse's HTTP interface that are not settings (HTTPHandler).
NOT_SETTINGS = frozenset(
    {
        "query", "database", "default_format", "user", "password", "quota_key", "query_id",
        "session_id", "session_timeout", "session_check", "close_session", "compress",
        "decompress", "buffer_size", "wait_end_of_query", "client_protocol_version", "role",
        "stacktrace",
    }
)  # fmt: skip
# ClickHouse's error codes for what the endpoint itself refuses.
NOT_IMPLEMENTED = 48
BAD_ARGUMENTS = 36
UNKNOWN_COMPRESSION = 272
AUTHENTICATION_FAILED = 516

_CODE = re.compile(r"Code: (\d+)\. DB::Exception: ")
_QUOTED = rb"'(?:[^'\\]|\\.)*'|`(?:[^`\\]|\\.)*`|\"(?:[^\"\\]|\\.)*\""
# `INSERT INTO t [(cols)] [SETTINGS ...] FORMAT fmt`, then its data after one newline.
_INSERT = re.compile(
    rb"\s*(INSERT\s+INTO\s(?:[^'`\"]|" + _QUOTED + rb")*?)\sFORMAT\s+(\w+)[ \t]*(?:\r?\n)?",
    re.IGNORECASE | re.DOTALL,
)
_VERSION = re.compile(r"\s*\(version [^)]*\)\s*$")
_SELECT = re.compile(rb"\bSELECT\b", re.IGNORECASE)
_READS = re.compile(r"\s*(SELECT|WITH|SHOW|DESC|DESCRIBE|EXISTS|EXPLAIN)\b", re.IGNORECASE)
_FORMAT_AT_END = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)


class ClickHouseError(Exception):
    """A failed request, as ClickHouse reports it: its code and `Code: N. DB::Exception:`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def of(cls, code: int, what: str) -> ClickHouseError:
        return cls(code, f"Code: {code}. DB::Exception: {what}")

    @classmethod
    def of_exception(cls, exc: Exception) -> ClickHouseError:
        """chDB's errors keep their code and text; anything else is a STD_EXCEPTION."""
        if isinstance(exc, ClickHouseError):
            return exc
        text = str(exc)
        found = _CODE.search(text)
        if found is None:
            return cls.of(1001, f"{type(exc).__name__}: {text}")
        return cls(int(found.group(1)), _VERSION.sub("", text[found.start() :]))


@dataclass(frozen=True)
class External:
    """An external table: a temporary table for one request, filled from a multipart file."""

    name: str
    fmt: str
    structure: str
    data: bytes


@dataclass(frozen=True)
class Request:
    """What one HTTP request asks of the store."""

    sql: bytes  # the statement, followed by an INSERT's data
    params: dict[str, str] = field(default_factory=dict)  # param_<name>, as text
    settings: dict[str, str] = field(default_factory=dict)
    database: str = ""
    default_format: str = "TabSeparated"
    external: tuple[External, ...] = ()


@dataclass(frozen=True)
class Result:
    body: bytes
    fmt: str | None  # the output format, for a statement that has a result
    read_rows: int = 0
    written_rows: int = 0


class Store:
    """One chDB store; each request on a connection of its own, one request at a time."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()
        self._anchor = self._connect()  # holds the store open between requests
        row = self._anchor.query("SELECT version(), timezone()", "TabSeparated").bytes()
        self.version, self.timezone = row.decode().strip().split("\t")

    def _connect(self) -> Any:
        import chdb  # here, not at the top: the test process only starts the endpoint

        return chdb.connect(str(self._path))

    def run(self, req: Request) -> Result:
        with self._lock:
            conn = self._connect()
            try:
                return _execute(conn, req)
            finally:
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._anchor.close()


def _execute(conn: Any, req: Request) -> Result:
    if req.database:
        conn.query(f"USE {quote_identifier(req.database)}")
    if req.settings:
        conn.query(
            "SET "
            + ", ".join(f"{quote_identifier(k)} = {_literal(v)}" for k, v in req.settings.items())
        )
    for ext in req.external:
        conn.query(f"CREATE TEMPORARY TABLE {quote_identifier(ext.name)} ({ext.structure})")
        _insert(conn, f"INSERT INTO {quote_identifier(ext.name)}", ext.fmt, ext.data)
    insert = _INSERT.match(req.sql)
    if insert is not None and not _SELECT.search(re.sub(_QUOTED, b"", insert.group(1))):
        data = req.sql[insert.end() :]
        written = _insert(conn, insert.group(1).decode(), insert.group(2).decode(), data)
        return Result(b"", None, written_rows=written)
    text = req.sql.decode()
    result = conn.query(text, req.default_format, params=req.params)
    end = _FORMAT_AT_END.search(text)
    fmt = (end.group(1) if end else req.default_format) if _READS.match(text) else None
    return Result(result.bytes(), fmt, read_rows=result.rows_read())


def _insert(conn: Any, statement: str, fmt: str, data: bytes) -> int:
    with conn.send_insert(statement, fmt) as inserter:
        if data:
            inserter.append(data)
        return int(inserter.finish().rows_written)


def _literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- the HTTP side: from a request to a `Request` ----------------------------------------


def parse_request(args: Mapping[str, str], content_type: str, body: bytes) -> Request:
    """ClickHouse's reading of an HTTP request: the query from the URL and the body (or a
    form), `param_` values, external tables, and every other parameter a setting."""
    values = dict(args)
    external: list[External] = []
    if content_type.startswith("multipart/form-data"):
        for name, filename, data in _form_parts(body, content_type):
            if filename is None:
                values[name] = data.decode()
            else:
                external.append(_external(name, data, values))
        body = b""
    query = values.pop("query", "").encode()
    sql = query + b"\n" + body if query and body else query or body
    described = {f"{e.name}_{what}" for e in external for what in ("format", "structure", "types")}
    settings = {
        k: v
        for k, v in values.items()
        if k not in NOT_SETTINGS and k not in described and not k.startswith("param_")
    }
    if values.get("decompress") == "1" or values.get("compress") == "1":
        raise ClickHouseError.of(NOT_IMPLEMENTED, "the endpoint has no compress/decompress")
    return Request(
        sql=sql,
        params={k[len("param_") :]: v for k, v in values.items() if k.startswith("param_")},
        settings=settings,
        database=values.get("database", ""),
        default_format=values.get("default_format", "TabSeparated"),
        external=tuple(external),
    )


def _external(name: str, data: bytes, values: Mapping[str, str]) -> External:
    structure = values.get(f"{name}_structure")
    if structure is None:
        types = values.get(f"{name}_types")
        if types is None:
            raise ClickHouseError.of(BAD_ARGUMENTS, f"external table {name}: no structure")
        structure = ", ".join(f"_{i} {t}" for i, t in enumerate(_split_types(types), 1))
    return External(name, values.get(f"{name}_format", "TabSeparated"), structure, data)


def _split_types(types: str) -> list[str]:
    """`UInt8,Decimal(38, 9)` -> its types (commas inside parentheses belong to a type)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(types):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(types[start:i].strip())
            start = i + 1
    return [*parts, types[start:].strip()]


def _form_parts(body: bytes, content_type: str) -> Iterator[tuple[str, str | None, bytes]]:
    """A multipart/form-data body's parts: (field name, file name or None, content)."""
    found = re.search(r'boundary="?([^";]+)"?', content_type)
    if found is None:
        raise ClickHouseError.of(BAD_ARGUMENTS, "multipart body without a boundary")
    for part in body.split(b"--" + found.group(1).encode())[1:]:
        if part.startswith(b"--"):
            return
        head, _, data = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        disposition = head.decode(errors="replace")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        if name is None:
            raise ClickHouseError.of(BAD_ARGUMENTS, "multipart part without a name")
        yield name.group(1), filename.group(1) if filename else None, data.removesuffix(b"\r\n")


def decode_body(data: bytes, encoding: str) -> bytes:
    """Undo a request's Content-Encoding (the last one applied first)."""
    for enc in reversed([e.strip().lower() for e in encoding.split(",") if e.strip()]):
        if enc == "gzip":
            data = gzip.decompress(data)
        elif enc == "deflate":
            data = zlib.decompress(data)
        elif enc == "zstd":
            data = zstd.decompress(data)
        elif enc == "lz4":
            data = _lz4_frames(data)
        elif enc != "identity":
            raise ClickHouseError.of(UNKNOWN_COMPRESSION, f"unknown Content-Encoding {enc}")
    return data


def _lz4_frames(data: bytes) -> bytes:
    """Every LZ4 frame of a body (clickhouse-connect compresses each block as a frame)."""
    out = []
    while data:
        d = lz4.frame.LZ4FrameDecompressor()
        out.append(d.decompress(data))
        data = d.unused_data
    return b"".join(out)


@dataclass(frozen=True)
class Credentials:
    """The one user; without a password every request is let in (ClickHouse's `default`)."""

    user: str = "default"
    password: str = ""

    def check(self, headers: Mapping[str, str], args: Mapping[str, str]) -> None:
        """`headers` by lower-case name."""
        if not self.password:
            return
        user, password = args.get("user", "default"), args.get("password", "")
        auth = headers.get("authorization", "")
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        elif "x-clickhouse-user" in headers:
            user, password = headers["x-clickhouse-user"], headers.get("x-clickhouse-key", "")
        if (user, password) != (self.user, self.password):
            raise ClickHouseError.of(
                AUTHENTICATION_FAILED,
                f"{user}: Authentication failed: password is incorrect, or there is no user "
                "with such name. (AUTHENTICATION_FAILED)",
            )


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: Store, credentials: Credentials) -> None:
        super().__init__(address, Handler)
        self.store = store
        self.credentials = credentials


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clickhouse-connect pools its connections
    server: Server

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        url = urlsplit(self.path)
        args = dict(parse_qsl(url.query, keep_blank_values=True))
        keep_alive, self.close_connection = not self.close_connection, True
        try:  # a body read halfway leaves the connection unusable: closed unless read whole
            body = decode_body(self._body(), self.headers.get("Content-Encoding", ""))
            self.close_connection = not keep_alive
            if url.path == "/ping" or (url.path == "/" and self.command == "GET" and not args):
                self._reply(200, b"Ok.\n", {})
                return
            headers = {k.lower(): v for k, v in self.headers.items()}
            self.server.credentials.check(headers, args)
            req = parse_request(args, self.headers.get("Content-Type", ""), body)
            result = self.server.store.run(req)
        except Exception as exc:
            error = ClickHouseError.of_exception(exc)
            status = 403 if error.code == AUTHENTICATION_FAILED else 500
            message = f"{error} (version {self.server.store.version})\n".encode()
            self._reply(status, message, {"X-ClickHouse-Exception-Code": str(error.code)})
            return
        summary = {"read_rows": str(result.read_rows), "written_rows": str(result.written_rows)}
        headers = {
            "X-ClickHouse-Summary": json.dumps(summary),
            "X-ClickHouse-Timezone": self.server.store.timezone,
            "X-ClickHouse-Query-Id": args.get("query_id", ""),
        }
        if result.fmt is not None:
            headers["X-ClickHouse-Format"] = result.fmt
        self._reply(200, result.body, headers)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


# -- running it: as its own process, and from a test --------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--path", type=Path, required=True, help="the chDB store")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    ap.add_argument("--user", default="default")
    ap.add_argument("--password", default="")
    a = ap.parse_args(argv)
    store = Store(a.path)
    server = Server((a.host, a.port), store, Credentials(a.user, a.password))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(server.server_address[1], flush=True)  # listening: connections queue from here
    try:
        server.serve_forever()
    finally:
        server.server_close()
        store.close()


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    user: str
    password: str
    pid: int


@contextmanager
def running(
    path: Path,
    user: str = "default",
    password: str = "",
    timeout: float = 60,
    host: str = "127.0.0.1",
) -> Iterator[Endpoint]:
    """The endpoint as a subprocess on a free port, ready once it printed the port (the
    store is open and the socket listens); stopped with SIGTERM, killed if it hangs."""
    cmd = [sys.executable, "-m", "tests.support.clickhouse_http", "--path", str(path.resolve())]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [*cmd, "--user", user, "--password", password, "--host", host],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=Path(__file__).resolve().parents[2],  # where `tests` is a package
            preexec_fn=die_with_parent,
        )
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], timeout)
            line = proc.stdout.readline() if ready else b""
            if not line.strip().isdigit():
                proc.kill()
                proc.wait()
                err.seek(0)
                raise RuntimeError(f"clickhouse_http did not start: {err.read().decode()}")
            yield Endpoint(host, int(line), user, password, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
