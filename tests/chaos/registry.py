"""A Confluent-compatible registry serving the packaged schemas; the harness can take it down."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from consumer.decode.schemas import SCHEMAS_DIR


class Registry:
    """GET /schemas/ids/<id> and /subjects/<s>/versions/latest like a registry; 503 while
    down (counted in `refused`).

    `outage(seconds)` takes it down from the next request on, not from now: a consumer
    slow to start (a loaded machine) still meets the whole outage instead of missing it."""

    def __init__(self) -> None:
        id_map: dict[str, str] = json.loads((SCHEMAS_DIR / "registry.json").read_text())
        self.bodies = {
            int(i): json.dumps({"schema": (SCHEMAS_DIR / name).read_text()}).encode()
            for i, name in id_map.items()
        }
        # subject -> the id its latest version holds (GET /subjects/<s>/versions/latest)
        self.subjects: dict[str, int] = {}
        self._lock = threading.Lock()
        self._outage: float | None = None  # armed: seconds from the next request
        self._until = 0.0
        self.refused = 0
        self.served = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def outage(self, seconds: float) -> None:
        with self._lock:
            self._outage = seconds

    def _down(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if self._outage is not None:
                self._until, self._outage = now + self._outage, None
            return now < self._until

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if registry._down():
                    registry.refused += 1
                    self._answer(503, {"error_code": 50301, "message": "unavailable"})
                    return
                latest = _latest_of(self.path)
                if latest is not None:
                    self._latest(latest)
                    return
                body = registry.bodies.get(_schema_id(self.path))
                if body is None:
                    self._answer(404, {"error_code": 40403, "message": "Schema not found"})
                    return
                registry.served += 1
                self._send(200, body)

            def _latest(self, subject: str) -> None:
                schema_id = registry.subjects.get(subject)
                if schema_id is None:
                    self._answer(404, {"error_code": 40401, "message": "Subject not found"})
                    return
                schema = json.loads(registry.bodies[schema_id])["schema"]
                doc = {"subject": subject, "version": 1, "id": schema_id, "schema": schema}
                registry.served += 1
                self._answer(200, doc)

            def _answer(self, status: int, doc: dict[str, Any]) -> None:
                self._send(status, json.dumps(doc).encode())

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


def _schema_id(path: str) -> int:
    prefix = "/schemas/ids/"
    try:
        return int(path[len(prefix) :]) if path.startswith(prefix) else -1
    except ValueError:
        return -1


def _latest_of(path: str) -> str | None:
    """The subject of a `/subjects/<subject>/versions/latest` request."""
    parts = path.split("/")
    if len(parts) == 5 and parts[1] == "subjects" and parts[3:] == ["versions", "latest"]:
        return urllib.parse.unquote(parts[2])
    return None
