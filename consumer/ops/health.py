"""/metrics, /healthz and /readyz on one port.

Liveness tracks the consume loop, the rollup and the emitter making progress while they
have work, not broker reachability (a broker outage must not restart every pod); readiness
reports the dependencies' last known state.
prometheus_client's WSGI app answers any path, so probes are routed before it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from consumer.clock import Clock
from consumer.liveness import Heartbeat
from consumer.metrics import Metrics


class Health:
    """Liveness: every part's heartbeat (consumer/liveness.py); readiness: the dependencies'
    last known state."""

    def __init__(self, clock: Clock, stall_seconds: float = 60.0) -> None:
        self._clock = clock
        self._stall = stall_seconds
        self.parts: dict[str, Heartbeat] = {}
        self.ready: dict[str, bool] = {"kafka": False, "clickhouse": False, "stripe": True}
        self.part("consume")  # from now: a loop that never starts is stuck too

    def part(self, name: str) -> Heartbeat:
        """The heartbeat of `name` (consume, rollup, emitter), made on first use."""
        if name not in self.parts:
            self.parts[name] = Heartbeat(self._clock)
        return self.parts[name]

    def progressed(self) -> None:
        """The consume loop went round once."""
        self.part("consume").beat()

    def stalled(self) -> list[str]:
        return sorted(n for n, hb in self.parts.items() if hb.stuck(self._stall))

    def live(self) -> bool:
        return not self.stalled()

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
                    else b"stalled: " + ",".join(health.stalled()).encode() + b"\n"
                )
            )
            start("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [body]
        result: Iterable[bytes] = metrics_app(environ, start)
        return result

    server = make_server(host, port, app, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True, name="http").start()
    return server, server.server_port
