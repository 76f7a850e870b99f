"""Wire formats: RFC 3339 times, exact decimal strings and bracket-notation form bodies."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Context, Decimal
from urllib.parse import parse_qsl

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$",
)
_KEY_PART = re.compile(r"\[([^\[\]]*)\]")


def format_rfc3339(epoch: float) -> str:
    """UTC with milliseconds and ``Z``, the form Stripe's documentation shows."""
    moment = datetime.fromtimestamp(epoch, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_rfc3339(text: str) -> float:
    """Epoch seconds from an RFC 3339 string; ValueError for anything else (dates, no zone)."""
    if not _RFC3339.match(text):
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    return datetime.fromisoformat(text.upper()).timestamp()


def format_decimal(value: Decimal) -> str:
    """Exact and canonical: ``10`` rather than ``1E+1``, ``1`` rather than ``1.000``."""
    exact = Context(prec=max(28, len(value.as_tuple().digits)))
    text = format(value.normalize(exact), "f")
    return "0" if text in ("-0", "0") else text


def parse_form(body: str) -> dict[str, object]:
    """Nest ``a[b][c]=v`` pairs into dicts, as Stripe does for v1 form bodies and queries."""
    result: dict[str, object] = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        head = key.split("[", 1)[0]
        path = [head, *_KEY_PART.findall(key[len(head) :])]
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return result
