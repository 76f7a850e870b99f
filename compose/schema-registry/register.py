"""Register the packaged writer schemas in the compose schema registry, under the ids the
producers frame messages with (consumer/decode/avsc/registry.json: 1 = v1 ... 4 = v4).

Run by docker-compose.yml's `schema-init` with the consumer image's Python and the consumer's
environment (schema.registry_url, kafka.topic). A Confluent registry gives a new schema the
next free id, so on the empty registry compose starts, v1..v4 registered in order under the
topic's value subject get exactly those ids; on a registry that already holds them nothing
changes. Anything else stops with a message: a consumer reading through that registry would
decode with the wrong schema or dead-letter good events.
"""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import fastavro

from consumer.config import load_settings
from consumer.decode.schemas import SCHEMAS_DIR, load_schema, schema_fingerprint

MEDIA_TYPE = "application/vnd.schemaregistry.v1+json"
NOT_FOUND = 40403  # the registry's "schema not found"


class Registry:
    def __init__(self, url: str, auth: tuple[str, str] | None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Accept": MEDIA_TYPE, "Content-Type": MEDIA_TYPE}
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def call(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(json.load(response))
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, dict(json.loads(exc.read() or b"{}"))
            except ValueError:
                return exc.code, {}

    def wait(self, attempts: int = 60) -> None:
        """The registry answers only once it has read its Kafka topic."""
        for _ in range(attempts - 1):
            try:
                if self.call("/subjects")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(2)
        self.call("/subjects")


def register(registry: Registry, subject: str) -> list[str]:
    """Each packaged schema under its id; raises SystemExit on any disagreement."""
    id_map: dict[str, str] = json.loads((SCHEMAS_DIR / "registry.json").read_text())
    done = []
    for schema_id, name in sorted(id_map.items(), key=lambda kv: int(kv[0])):
        local = schema_fingerprint(load_schema(SCHEMAS_DIR / name))
        status, body = registry.call(f"/schemas/ids/{schema_id}")
        if status == 200:
            held = schema_fingerprint(fastavro.parse_schema(json.loads(body["schema"])))
            if held != local:
                raise SystemExit(f"schema id {schema_id} holds another schema than {name}")
            done.append(f"id {schema_id}: {name} (already registered)")
            continue
        if body.get("error_code") != NOT_FOUND:
            raise SystemExit(f"schema id {schema_id}: the registry answered HTTP {status}")
        text = json.dumps(json.loads((SCHEMAS_DIR / name).read_text()))
        path = f"/subjects/{urllib.parse.quote(subject, safe='')}/versions"
        status, body = registry.call(path, {"schema": text, "schemaType": "AVRO"})
        if status != 200:
            raise SystemExit(f"{name}: the registry refused it (HTTP {status}: {body})")
        if body.get("id") != int(schema_id):
            raise SystemExit(
                f"{name} was given id {body.get('id')}, the producers frame it as {schema_id}: "
                "register the schemas on an empty registry"
            )
        done.append(f"id {schema_id}: {name} (registered)")
    return done


def main() -> int:
    settings = load_settings()
    cfg = settings.schema_
    if not cfg.registry_url:
        print("register: schema.registry_url is not set", file=sys.stderr)
        return 2
    auth = None
    if cfg.registry_username and cfg.registry_password:
        auth = (cfg.registry_username, cfg.registry_password.get_secret_value())
    registry = Registry(cfg.registry_url, auth)
    registry.wait()
    for line in register(registry, f"{settings.kafka.topic}-value"):
        print(f"register: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
