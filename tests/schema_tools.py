"""Schema rewriting shared by the decoder's differential tests and its fuzzer (pure: no
consumer module is imported, so the fuzzer can load a sanitized build first)."""

from __future__ import annotations

from typing import Any


def without_logical(node: Any) -> Any:
    """The schema with its logical types (and fastavro's `__` keys) taken out: the raw
    values the reference decodes, to hold the C decoder's own to."""
    if isinstance(node, dict):
        return {
            k: without_logical(v)
            for k, v in node.items()
            if k != "logicalType" and not k.startswith("__")
        }
    if isinstance(node, list):
        return [without_logical(v) for v in node]
    return node
