"""Schema loading, the local id map and the registry client against an in-process server."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import fastavro
import pytest

from consumer.decode.schemas import (
    SCHEMAS_DIR,
    LocalSchemaSource,
    RegistrySchemaSource,
    SchemaSourceUnavailable,
    UnknownSchemaId,
    load_schema,
    reader_schema,
    schema_fingerprint,
)

V2_TEXT = (SCHEMAS_DIR / "usage_event.v2.avsc").read_text()
V2 = load_schema(SCHEMAS_DIR / "usage_event.v2.avsc")


def field_names(schema: dict[str, Any]) -> list[str]:
    return [f["name"] for f in schema["fields"]]


def test_reader_schema_is_v4_contract() -> None:
    schema = reader_schema()
    assert schema["name"] == "io.usageconsumer.UsageEvent"
    names = field_names(schema)
    assert names == [
        "event_id", "event_name", "customer_id", "value", "timestamp", "properties", "source",
        "cancels",
    ]  # fmt: skip
    assert all(f.get("doc") for f in schema["fields"])
    value = schema["fields"][3]["type"]
    assert (value["logicalType"], value["precision"], value["scale"]) == ("decimal", 38, 9)
    assert schema["fields"][5]["default"] == {}
    assert schema["fields"][7]["default"] == ""


def test_versions_differ_only_by_optional_fields() -> None:
    v1 = load_schema(SCHEMAS_DIR / "usage_event.v1.avsc")
    v3 = load_schema(SCHEMAS_DIR / "usage_event.v3.avsc")
    assert field_names(v1) == field_names(V2)[:-1]
    assert field_names(v3) == [*field_names(V2), "source"]
    assert field_names(reader_schema()) == [*field_names(v3), "cancels"]
    assert v3["fields"][-1]["default"] == ""


def test_load_schema_missing_file_says_where(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.avsc"):
        load_schema(tmp_path / "nope.avsc")


def test_local_source_loads_registry_json() -> None:
    source = LocalSchemaSource()
    assert source.schema_ids == {1, 2, 3, 4}
    assert field_names(source.writer_schema(2)) == field_names(V2)
    assert field_names(source.writer_schema(4)) == field_names(reader_schema())
    assert "properties" not in field_names(source.writer_schema(1))
    with pytest.raises(UnknownSchemaId):
        source.writer_schema(5)


def test_local_source_resolves_relative_to_its_file(tmp_path: Path) -> None:
    (tmp_path / "mine.avsc").write_text(V2_TEXT)
    (tmp_path / "registry.json").write_text(json.dumps({"42": "mine.avsc"}))
    source = LocalSchemaSource(tmp_path)
    assert source.schema_ids == {42}
    assert schema_fingerprint(source.writer_schema(42)) == schema_fingerprint(V2)


def test_fingerprint_is_stable_and_ignores_docs() -> None:
    raw = json.loads(V2_TEXT)
    for f in raw["fields"]:
        f["doc"] = "changed"
    undocumented = load_schema_from(raw)
    assert schema_fingerprint(undocumented) == schema_fingerprint(V2)
    assert len(schema_fingerprint(reader_schema())) == 16


def test_fingerprint_sees_scale_and_version_changes() -> None:
    raw = json.loads(V2_TEXT)
    raw["fields"][3]["type"]["scale"] = 6
    assert schema_fingerprint(load_schema_from(raw)) != schema_fingerprint(V2)
    v3 = load_schema(SCHEMAS_DIR / "usage_event.v3.avsc")
    assert schema_fingerprint(v3) != schema_fingerprint(V2)
    assert schema_fingerprint(reader_schema()) != schema_fingerprint(v3)


def load_schema_from(raw: dict[str, Any]) -> Any:
    return fastavro.parse_schema(raw)


# --- registry client -----------------------------------------------------------------


class _Registry(BaseHTTPRequestHandler):
    """A Confluent-like registry: id 2 exists, 500 fails, 777 is not Avro, the rest 404."""

    requests: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        self.requests.append((self.path, self.headers.get("Authorization")))
        if self.path == "/schemas/ids/2":
            self._reply(200, {"schema": V2_TEXT})
        elif self.path == "/schemas/ids/500":
            self._reply(500, {"error_code": 50001, "message": "boom"})
        elif self.path == "/schemas/ids/777":
            self._reply(200, {"schema": "syntax = 'proto3';", "schemaType": "PROTOBUF"})
        elif self.path == "/schemas/ids/888":
            self._reply(200, {"schema": '{"type": "record"}'})
        elif self.path == "/schemas/ids/999":
            self._send(200, b"<html>proxy login</html>")
        elif self.path == "/schemas/ids/401":
            self._reply(401, {"error_code": 401, "message": "unauthorized"})
        elif not self.path.startswith("/schemas/ids/"):
            self._send(404, b"<html>not found</html>")  # not the registry at all
        else:
            self._reply(404, {"error_code": 40403, "message": "Schema not found"})

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body).encode())

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def registry() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    _Registry.requests = []
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_registry_hit(registry: str) -> None:
    schema = RegistrySchemaSource(registry + "/").writer_schema(2)
    assert schema_fingerprint(schema) == schema_fingerprint(V2)
    assert _Registry.requests == [("/schemas/ids/2", None)]


def test_registry_caches_successes(registry: str) -> None:
    source = RegistrySchemaSource(registry)
    first = source.writer_schema(2)
    assert source.writer_schema(2) is first
    assert len(_Registry.requests) == 1


def test_registry_404_is_unknown_and_not_cached(registry: str) -> None:
    source = RegistrySchemaSource(registry)
    for _ in range(2):
        with pytest.raises(UnknownSchemaId):
            source.writer_schema(12345)
    assert len(_Registry.requests) == 2


def test_registry_500_is_transient(registry: str) -> None:
    with pytest.raises(SchemaSourceUnavailable, match="500"):
        RegistrySchemaSource(registry).writer_schema(500)


def test_registry_auth_failure_is_transient(registry: str) -> None:
    """A credentials problem must pause the consumer, not dead-letter every message."""
    with pytest.raises(SchemaSourceUnavailable, match="401"):
        RegistrySchemaSource(registry).writer_schema(401)


def test_registry_non_json_answer_is_transient(registry: str) -> None:
    with pytest.raises(SchemaSourceUnavailable):
        RegistrySchemaSource(registry).writer_schema(999)


@pytest.mark.parametrize("schema_id", [777, 888])
def test_registry_unusable_schema_is_permanent(registry: str, schema_id: int) -> None:
    with pytest.raises(UnknownSchemaId):
        RegistrySchemaSource(registry).writer_schema(schema_id)


def _refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_registry_refused_port_is_transient() -> None:
    with pytest.raises(SchemaSourceUnavailable):
        RegistrySchemaSource(_refused_url(), timeout=1.0).writer_schema(2)


def test_registry_timeout_is_transient() -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(SchemaSourceUnavailable):
            RegistrySchemaSource(url, timeout=0.2).writer_schema(2)


def test_registry_sends_basic_auth(registry: str) -> None:
    RegistrySchemaSource(registry, auth=("key", "s3cret")).writer_schema(2)
    expected = "Basic " + base64.b64encode(b"key:s3cret").decode()
    assert _Registry.requests == [("/schemas/ids/2", expected)]


def test_credentials_never_reach_error_messages() -> None:
    host = _refused_url().removeprefix("http://")
    source = RegistrySchemaSource(f"http://key:s3cret@{host}", timeout=1.0)
    with pytest.raises(SchemaSourceUnavailable) as err:
        source.writer_schema(2)
    assert "s3cret" not in str(err.value)
    assert "key" not in str(err.value)


def test_credentials_in_url_become_basic_auth(registry: str) -> None:
    host = registry.removeprefix("http://")
    RegistrySchemaSource(f"http://key:s3cret@{host}").writer_schema(2)
    expected = "Basic " + base64.b64encode(b"key:s3cret").decode()
    assert _Registry.requests == [("/schemas/ids/2", expected)]


def test_bare_404_is_an_outage_not_an_unknown_id(registry: str) -> None:
    """A wrong registry path answers 404 without the registry's error code: never a dead letter."""
    source = RegistrySchemaSource(registry + "/wrong-prefix")
    with pytest.raises(SchemaSourceUnavailable):
        source.writer_schema(2)
