"""The schema registry: reachable, and the newest schema registered for the topic's value
subject (what new producers write) readable by this build's reader schema."""

from __future__ import annotations

import io
from typing import Any

import fastavro

from consumer.decode.event import DecodeError
from consumer.decode.fast import without_logical
from consumer.decode.reference import plain_reader
from consumer.decode.schemas import RegistrySchemaSource, UnknownSchemaId, reader_schema
from consumer.ops.doctor.report import Finding, fail, ok, warn
from consumer.ops.doctor.runner import Env


def registry(env: Env) -> list[Finding]:
    cfg, name = env.settings.schema_, "schema registry"
    if cfg.mode == "plain":
        return [ok(name, "not used: plain Avro, the writer schema is schema.plain_writer_schema")]
    if not cfg.registry_url:
        return [ok(name, "not configured: writer schemas from the packaged id map")]
    auth = None
    if cfg.registry_username and cfg.registry_password:
        auth = (cfg.registry_username, cfg.registry_password.get_secret_value())
    source = RegistrySchemaSource(cfg.registry_url, timeout=env.timeout, auth=auth)
    subject = f"{env.settings.kafka.topic}-value"  # the topic name strategy producers use
    try:
        schema_id, writer = source.latest(subject)
    except UnknownSchemaId:
        return [
            warn(
                name,
                f"reachable; no schema registered under {subject} yet",
                f"register the producers' schema under {subject} (compose: schema-init)",
            )
        ]
    problem = unreadable(writer)
    if problem is not None:
        return [
            fail(
                name,
                f"{subject} latest is id {schema_id}, which the reader schema cannot read: "
                f"{problem}",
                "register a schema the reader can read (fields of usage_event.v4), or "
                "upgrade usage-consumer to a build that reads it",
            )
        ]
    return [ok(name, f"{subject} latest is id {schema_id}, readable by the reader schema")]


def unreadable(writer: Any) -> str | None:
    """Why the reader schema cannot read what `writer` writes, or None. The decoder's own
    checks first (fields, decimal precision, timestamp type), then trial messages with
    every field filled, read as a consumer reads them (Avro's resolution of each field):
    as many as the widest union has branches, so that each branch is written once."""
    try:
        decode = plain_reader(writer, reader_schema())
        stripped = fastavro.parse_schema(without_logical(writer))
        for pick in range(_widest(stripped, set())):
            body = io.BytesIO()
            fastavro.schemaless_writer(body, stripped, _trial(stripped, {}, pick))
            decode(body.getvalue())
    except DecodeError as exc:
        return exc.detail
    except (ValueError, KeyError, TypeError) as exc:
        return str(exc)
    return None


_PRIMITIVE: dict[str, Any] = {
    "null": None,
    "boolean": True,
    "int": 1,
    "long": 1,
    "float": 1.0,
    "double": 1.0,
    "string": "x",
    "bytes": b"\x01",  # a valid decimal too (unscaled 1)
}


def _trial(node: Any, named: dict[str, Any], pick: int) -> Any:
    """A value of every part of a (logical-type-free) schema; each union takes its branch
    number `pick` (its last when it has fewer)."""
    if isinstance(node, str):
        return _PRIMITIVE[node] if node in _PRIMITIVE else _trial(named[node], named, pick)
    if isinstance(node, list):
        return _trial(node[min(pick, len(node) - 1)], named, pick)
    kind = node["type"]
    if "name" in node and kind in ("record", "enum", "fixed"):
        named[node["name"]] = node
    if kind == "record":
        return {f["name"]: _trial(f["type"], named, pick) for f in node["fields"]}
    if kind == "enum":
        return node["symbols"][min(pick, len(node["symbols"]) - 1)]
    if kind == "fixed":
        return b"\x01" * node["size"]
    if kind == "array":
        return [_trial(node["items"], named, pick)]
    if kind == "map":
        return {"k": _trial(node["values"], named, pick)}
    return _trial(kind, named, pick)


def _widest(node: Any, seen: set[str]) -> int:
    """The most branches of any union in the schema (1 without one)."""
    if isinstance(node, list):
        return max([len(node), *(_widest(b, seen) for b in node)])
    if not isinstance(node, dict) or node.get("name") in seen:
        return 1
    if "name" in node:
        seen.add(node["name"])
    parts = [f["type"] for f in node.get("fields", [])]
    parts += [node[k] for k in ("items", "values") if k in node]
    return max([1, *(_widest(p, seen) for p in parts)])
