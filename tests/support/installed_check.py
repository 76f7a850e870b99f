"""Run by path with an installed package's interpreter (tests/integration/test_install.py):
the packaged schemas load through importlib.resources and a message of every schema version
decodes, by the fast path where it runs, and the packaged migrations build a fresh store.
Prints one JSON line.

    python tests/support/installed_check.py [--no-fast]
"""

from __future__ import annotations

import io
import json
import logging
import sys
import tempfile
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro

import consumer
from consumer.app import build_decoder
from consumer.config import SchemaConfig
from consumer.decode import fast
from consumer.decode.schemas import SCHEMAS_DIR, LocalSchemaSource, load_schema
from consumer.store.chdb import ChdbBackend
from consumer.store.migrations import migrate

FULL: dict[str, Any] = {
    "event_id": "evt-1",
    "event_name": "api_calls",
    "customer_id": "cus_1",
    "value": Decimal("1.500000000"),
    "timestamp": datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
    "properties": {"region": "eu"},
    "source": "checkout",
    "cancels": "",
}


def main(use_fast: bool) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
    decoder = build_decoder(SchemaConfig(fast_decoder=use_fast))
    registry = json.loads((SCHEMAS_DIR / "registry.json").read_text())
    versions = {}
    for schema_id, name in sorted(registry.items(), key=lambda kv: int(kv[0])):
        writer: dict[str, Any] = fastavro.parse_schema(load_schema(SCHEMAS_DIR / name))  # type: ignore[assignment]
        buf = io.BytesIO()
        fields = {f["name"] for f in writer["fields"]}
        fastavro.schemaless_writer(buf, writer, {k: v for k, v in FULL.items() if k in fields})
        message = b"\0" + int(schema_id).to_bytes(4, "big") + buf.getvalue()
        event = decoder.decode(message)
        batch = fast.decode_batch([message], decoder.programs([int(schema_id)]))
        versions[name] = {
            "event_id": event.event_id,
            "value": str(event.value),
            "timestamp_ms": event.timestamp_ms,
            "properties": dict(event.properties),
            "fast_row": not bool(batch.slow[0]),
            "fast_event_id": batch.event_id[0].as_py(),
        }
    with tempfile.TemporaryDirectory() as tmp:  # the packaged migrations, on a fresh store
        store = ChdbBackend(Path(tmp) / "chdb", "usage")
        try:
            applied = migrate(store)
        finally:
            store.close()
    return {
        "module": consumer.__file__,
        "migrations": applied,
        "schema_ids": sorted(LocalSchemaSource().schema_ids),
        "fast": decoder.fast,
        "unavailable": fast.UNAVAILABLE,
        "versions": versions,
    }


if __name__ == "__main__":
    print(json.dumps(main("--no-fast" not in sys.argv[1:])))
