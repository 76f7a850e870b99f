"""The emulator's HTTP front: standard library only, one thread per connection.

One server answers for both SDK base addresses ("api" and "meter_events"), so a test points
``base_addresses={"api": url, "meter_events": url}`` at :attr:`EmulatorServer.url`.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, cast
from urllib.parse import urlsplit

from consumer.local.emulator.errors import EmulatorError
from consumer.local.emulator.options import EmulatorOptions
from consumer.local.emulator.routes import Request, find_route, stripe_account
from consumer.local.emulator.state import State

__all__ = ["EmulatorServer", "main", "serve"]

# How often the serving loop checks for stop(); short so tests tear down quickly.
_POLL_SECONDS = 0.02


class _HTTPServer(ThreadingHTTPServer):
    """Carries the shared :class:`State` to every handler thread."""

    daemon_threads = True
    state: State


class _Handler(BaseHTTPRequestHandler):
    """Turns one HTTP request into a route call and a JSON answer."""

    server_version = "stripe-emulator"
    # Keep-alive, as Stripe's API offers: a new connection per request would cost both
    # sides more than the request itself at the stream's rates.
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without this, Nagle's algorithm holds the
        # body for the client's delayed ACK (40 ms) on a kept-alive connection.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def _state(self) -> State:
        return cast(_HTTPServer, self.server).state

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _read_request(self) -> Request:
        length_header = self.headers.get("Content-Length") or "0"
        length = int(length_header) if length_header.isdigit() else 0
        parts = urlsplit(self.path)
        return Request(
            method=self.command,
            path=parts.path,
            query=parts.query,
            body=self.rfile.read(length) if length else b"",
            headers={key: value for key, value in self.headers.items()},
        )

    def _handle(self) -> None:
        request = self._read_request()
        kind = "unknown"
        headers: dict[str, str] = {}
        state = self._state
        try:
            route, groups = find_route(request.method, request.path)
            kind = route.kind
            if kind != "control":
                state = state.account(stripe_account(request, v2=request.path.startswith("/v2")))
            status, body = 200, route.handler(state, request, groups)
        except EmulatorError as exc:
            status, body, headers = exc.status, exc.body, exc.headers
        except Exception:
            traceback.print_exc(file=sys.stderr)
            status = 500
            body = {"error": {"type": "api_error", "message": "Emulator bug; see its stderr."}}
        if kind != "control":
            state.record_request(kind if kind in ("stream", "session") else None, status)
        if kind == "stream" and status == 200 and state.reset_answer():
            self._reset()  # stored, but the client never hears so
            return
        self._answer(status, body, headers)

    def _reset(self) -> None:
        """Close with RST (linger 0): the client sees a connection reset, not an answer."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _answer(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Request-Id", f"req_{secrets.token_hex(8)}")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        # A client that went away (a killed consumer) is no error of the emulator's.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """One line per request on stderr, only when the ``verbose`` option is on."""
        if self._state.options.verbose:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")


class EmulatorServer:
    """Owns the HTTP server and its thread. :func:`serve` returns one already started;
    :meth:`start` and :meth:`stop` are idempotent, and it works as a context manager."""

    def __init__(
        self,
        host: str,
        port: int,
        options: EmulatorOptions,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = State(clock, options)
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.state = self.state
        bound_port = self._httpd.server_address[1]
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
        self.url = f"http://{shown}:{bound_port}"
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> None:
        """Begin serving in a daemon thread; a second call does nothing."""
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": _POLL_SECONDS},
                name="stripe-emulator",
                daemon=True,
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the port; safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> EmulatorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    host: str, port: int, options: EmulatorOptions, clock: Callable[[], float] = time.time
) -> EmulatorServer:
    """Start an emulator; ``port=0`` picks a free port, and ``url`` then holds the real one."""
    server = EmulatorServer(host, port, options, clock)
    server.start()
    return server


def main(host: str, port: int, options: EmulatorOptions) -> None:
    """Serve until SIGTERM or SIGINT; the printed line tells scripts where to connect."""
    server = serve(host, port, options)
    done = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"stripe-emulator listening on {server.url}", flush=True)
        while not done.wait(0.2):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
