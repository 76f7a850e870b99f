"""Avro schemas: the local `.avsc` files and where writer schemas come from.

A writer schema is looked up by the id in the Confluent frame, either from the id map shipped
with the package (`avsc/registry.json`) or from a Confluent-compatible schema registry. The
two failure kinds are kept apart on purpose: an unknown id is permanent (the message is dead
lettered), an unreachable registry is transient (the caller pauses and retries, P6).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any, Protocol

import fastavro
from fastavro.schema import SchemaParseException

# Package data, read through importlib.resources so any install (wheel, image) finds it.
SCHEMAS_DIR: Traversable = files("consumer.decode") / "avsc"
READER_SCHEMA_FILE = "usage_event.v4.avsc"
_MAX_RESPONSE_BYTES = 4 * 1024 * 1024
_NOT_FOUND_CODE = 40403
_SUBJECT_NOT_FOUND_CODES = {40401, 40402}  # no such subject; no such version
# What fastavro.parse_schema raises for a malformed schema (UnknownType is a ValueError).
_SCHEMA_ERRORS = (SchemaParseException, ValueError, KeyError, TypeError, AttributeError)


class UnknownSchemaId(Exception):
    """The id has no schema (or no usable Avro schema); permanent for that id."""


class SchemaSourceUnavailable(Exception):
    """The schema could not be fetched right now; retry later, never dead letter."""


class SchemaSource(Protocol):
    def writer_schema(self, schema_id: int) -> Any:
        """The parsed writer schema for `schema_id`.

        Raises UnknownSchemaId (permanent) or SchemaSourceUnavailable (transient).
        """
        ...


def _existing(path: Traversable) -> Traversable:
    if not path.is_file():
        raise FileNotFoundError(f"schema file {path} not found")
    return path


def load_schema(path: Traversable) -> dict[str, Any]:
    """Parse one `.avsc` file; fails early on a malformed schema."""
    with _existing(path).open(encoding="utf-8") as f:
        parsed = fastavro.parse_schema(json.load(f))
    if not isinstance(parsed, dict):
        raise ValueError(f"{path}: expected a record schema")
    return parsed


@functools.lru_cache(maxsize=1)
def reader_schema() -> dict[str, Any]:
    """The current contract (v4); every writer version is decoded into this shape.

    Cached: callers share one parsed object and must not mutate it.
    """
    return load_schema(SCHEMAS_DIR / READER_SCHEMA_FILE)


def _normal_form(node: Any) -> Any:
    """The schema without docs and fastavro's bookkeeping keys."""
    if isinstance(node, dict):
        return {
            k: _normal_form(v) for k, v in node.items() if k != "doc" and not k.startswith("__")
        }
    if isinstance(node, list):
        return [_normal_form(v) for v in node]
    return node


def schema_fingerprint(parsed: Any) -> str:
    """A short stable hash for config/snapshot hashes.

    Unlike the Avro Parsing Canonical Form it keeps logicalType, precision, scale and
    defaults, because a change to any of them changes the decoded values. Docs are ignored.
    """
    text = json.dumps(_normal_form(parsed), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class LocalSchemaSource:
    """Writer schemas from an id map (`registry.json`) and the `.avsc` files beside it; by
    default the package's own; never transient."""

    def __init__(self, directory: Traversable = SCHEMAS_DIR) -> None:
        with _existing(directory / "registry.json").open(encoding="utf-8") as f:
            id_map: dict[str, str] = json.load(f)
        base = directory
        self._schemas: dict[int, Any] = {
            int(sid): load_schema(base / name) for sid, name in id_map.items()
        }

    @property
    def schema_ids(self) -> frozenset[int]:
        return frozenset(self._schemas)

    def writer_schema(self, schema_id: int) -> Any:
        try:
            return self._schemas[schema_id]
        except KeyError:
            raise UnknownSchemaId(f"schema id {schema_id} is not in the local id map") from None


def _split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """Move `user:pass@` out of the URL so it can never reach a log line."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url.rstrip("/"), None
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    clean = urllib.parse.urlunsplit(parts._replace(netloc=netloc)).rstrip("/")
    user = urllib.parse.unquote(parts.username)
    return clean, (user, urllib.parse.unquote(parts.password or ""))


class RegistrySchemaSource:
    """Writer schemas from a Confluent Schema Registry (GET /schemas/ids/{id}).

    Successes are cached forever: registry ids are immutable. Failures are not cached,
    so a schema registered moments ago (or a registry that recovers) is picked up.
    """

    def __init__(self, url: str, timeout: float = 5.0, auth: tuple[str, str] | None = None) -> None:
        self._url, url_auth = _split_credentials(url)
        self._timeout = timeout
        self._headers = {"Accept": "application/vnd.schemaregistry.v1+json, application/json"}
        user_pass = auth or url_auth
        if user_pass is not None:
            token = base64.b64encode(f"{user_pass[0]}:{user_pass[1]}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        self._cache: dict[int, Any] = {}

    def writer_schema(self, schema_id: int) -> Any:
        cached = self._cache.get(schema_id)
        if cached is None:
            cached = self._cache[schema_id] = _parse_registry_body(schema_id, self._get(schema_id))
        return cached

    def latest(self, subject: str) -> tuple[int, Any]:
        """The id and parsed schema of the newest version registered under `subject` (what
        new producers write). Raises UnknownSchemaId when the subject has none,
        SchemaSourceUnavailable as `writer_schema` does."""
        path = f"/subjects/{urllib.parse.quote(subject, safe='')}/versions/latest"
        body = self._fetch(path, f"schema under subject {subject}", _SUBJECT_NOT_FOUND_CODES)
        try:
            schema_id = int(json.loads(body)["id"])
        except (ValueError, KeyError, TypeError) as exc:
            msg = f"schema registry answer for subject {subject} has no id ({exc!r})"
            raise SchemaSourceUnavailable(msg) from None
        return schema_id, _parse_registry_body(schema_id, body)

    def _get(self, schema_id: int) -> bytes:
        """The response body for `schema_id`; maps every failure to one of the two kinds."""
        if schema_id < 0:
            raise UnknownSchemaId(f"schema id {schema_id} is negative")
        return self._fetch(f"/schemas/ids/{schema_id}", f"schema id {schema_id}", {_NOT_FOUND_CODE})

    def _fetch(self, path: str, what: str, not_found: set[int]) -> bytes:
        where = f"{self._url}{path}"
        request = urllib.request.Request(where, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                body: bytes = response.read(_MAX_RESPONSE_BYTES)
                return body
        except urllib.error.HTTPError as exc:
            raise _http_failure(what, where, exc, not_found) from None
        except (urllib.error.URLError, HTTPException, OSError) as exc:
            msg = f"schema registry {where} unreachable: {type(exc).__name__}"
            raise SchemaSourceUnavailable(msg) from None


def _http_failure(
    what: str, where: str, exc: urllib.error.HTTPError, not_found: set[int]
) -> Exception:
    """Only the registry's own not-found codes (40403 for an id) mean it does not exist. A
    bare 404 (a wrong URL, a proxy) is treated as an outage: pausing beats dead-lettering
    every message (P6)."""
    try:
        code = json.loads(exc.read(_MAX_RESPONSE_BYTES)).get("error_code")
    except (ValueError, AttributeError, OSError):
        code = None
    if code in not_found:
        return UnknownSchemaId(f"schema registry has no {what}")
    return SchemaSourceUnavailable(f"schema registry {where} answered HTTP {exc.code}")


def _parse_registry_body(schema_id: int, body: bytes) -> Any:
    """A body that is not the registry's JSON is treated as a transient proxy/registry
    fault; a well-formed answer holding a non-Avro or invalid schema is permanent."""
    try:
        doc = json.loads(body)
        text = doc["schema"]
        kind = doc.get("schemaType", "AVRO")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SchemaSourceUnavailable(
            f"schema registry answer for id {schema_id} is not a schema document"
        ) from None
    if kind != "AVRO" or not isinstance(text, str):
        raise UnknownSchemaId(f"schema id {schema_id} is not an Avro schema ({kind})")
    try:
        return fastavro.parse_schema(json.loads(text))
    except _SCHEMA_ERRORS as exc:
        raise UnknownSchemaId(
            f"schema id {schema_id} is not a valid Avro schema: {type(exc).__name__}"
        ) from None
