"""/metrics, /healthz and /readyz on one port.

Liveness tracks the poll loop making progress, not broker reachability (a broker outage
must not restart every pod); readiness reports the dependencies' last known state.
prometheus_client's WSGI app answers any path, so probes are routed before it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from consumer.clock import Clock
from consumer.metrics import Metrics


class Health:
    def __init__(self, clock: Clock, stall_seconds: float = 60.0) -> None:
        self._clock = clock
        self._stall = stall_seconds
        self.last_progress = clock.monotonic()
        self.ready: dict[str, bool] = {"kafka": False, "clickhouse": False, "stripe": True}

    def progressed(self) -> None:
        self.last_progress = self._clock.monotonic()

    def live(self) -> bool:
        return self._clock.monotonic() - self.last_progress < self._stall

    def is_ready(self) -> bool:
        return all(self.ready.values())


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


def serve(host: str, port: int, metrics: Metrics, health: Health) -> tuple[WSGIServer, int]:
    """Start the HTTP endpoints in a daemon thread; returns the server and its bound port."""
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok = health.live() if path == "/healthz" else health.is_ready()
            body = (
                b"ok\n"
                if ok
                else (
                    b"not ready: "
                    + ",".join(k for k, v in health.ready.items() if not v).encode()
                    + b"\n"
                    if path == "/readyz"
                    else b"poll loop stalled\n"
                )
            )
            start("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [body]
        result: Iterable[bytes] = metrics_app(environ, start)
        return result

    server = make_server(host, port, app, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True, name="http").start()
    return server, server.server_port
