"""Stripe v1 cursor pagination (limit, starting_after, ending_before) over an ordered list."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from consumer.local.emulator.errors import v1_error

T = TypeVar("T")


def parse_limit(params: Mapping[str, object]) -> int:
    """``limit`` is 1 to 100 and defaults to 10, as on every Stripe v1 list."""
    raw = params.get("limit", "10")
    try:
        limit = int(str(raw))
    except ValueError:
        raise v1_error(400, "Invalid integer: limit", param="limit") from None
    if not 1 <= limit <= 100:
        raise v1_error(400, "limit must be between 1 and 100", param="limit")
    return limit


def _position(ids: list[str], cursor: str, param: str) -> int:
    try:
        return ids.index(cursor)
    except ValueError:
        message = f"No such object: '{cursor}'"
        raise v1_error(404, message, param=param, code="resource_missing") from None


def paginate(
    items: Sequence[T], key: Callable[[T], str], params: Mapping[str, object]
) -> tuple[list[T], bool]:
    """One page of ``items`` (already in list order) and whether more lie beyond it."""
    limit = parse_limit(params)
    ids = [key(item) for item in items]
    after, before = params.get("starting_after"), params.get("ending_before")
    if after is not None and before is not None:
        raise v1_error(400, "Use starting_after or ending_before, not both", param="ending_before")
    if isinstance(before, str):
        end = _position(ids, before, "ending_before")
        start = max(0, end - limit)
        return list(items[start:end]), start > 0
    start = _position(ids, after, "starting_after") + 1 if isinstance(after, str) else 0
    page = list(items[start : start + limit])
    return page, start + limit < len(items)


def list_object(url: str, data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """The v1 list envelope."""
    return {"object": "list", "data": data, "has_more": has_more, "url": url}
