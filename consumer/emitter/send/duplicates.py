"""What a duplicate-identifier 400 tells: which events of the request Stripe already holds.

Stripe answers a repeated identifier with a 400 whose message names it ("An event already
exists with identifier <id>." as seen in the field); the answer may name every duplicate,
only the first, or none. Only identifiers of the request itself count: a name is read as a
whole token of the message or of another text field of the error, so `<id>` never matches
inside `<id>-p1` (the second event of a push split into parts, units.parts), and anything
else the text holds is ignored. An empty result means the answer named nothing usable.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import stripe

DUPLICATE_CODES = frozenset({"duplicate_meter_event", "duplicate_identifier"})
# Fields of an error that never name an identifier.
_NOT_NAMES = frozenset({"type", "code", "doc_url", "request_log_url"})
# Tokens are runs between whitespace, quotes, brackets and list punctuation; a trailing
# full stop or colon ends the sentence, not the identifier.
_TOKEN = re.compile(r"[^\s,;'\"`()\[\]{}<>]+")
_TRAILING = ".:"


def code(err: stripe.StripeError) -> str | None:
    """The error code, from the exception or from its JSON body (the SDK fills one or the
    other depending on the error class)."""
    if err.code:
        return str(err.code)
    inner = _inner(err)
    value = inner.get("code")
    return str(value) if value else None


def is_duplicate(err: stripe.StripeError) -> bool:
    return code(err) in DUPLICATE_CODES


def named(err: stripe.StripeError, identifiers: Collection[str]) -> set[str]:
    """The identifiers of `identifiers` (the request's events) that the answer names."""
    wanted = identifiers if isinstance(identifiers, set | frozenset) else set(identifiers)
    found: set[str] = set()
    for text in _texts(err):
        for token in _TOKEN.findall(text):
            if token in wanted:
                found.add(token)
                continue
            bare = token.rstrip(_TRAILING)
            if bare in wanted:
                found.add(bare)
    return found


def _inner(err: stripe.StripeError) -> Mapping[str, Any]:
    body = err.json_body if isinstance(err.json_body, dict) else {}
    inner = body.get("error")
    return inner if isinstance(inner, dict) else {}


def _texts(err: stripe.StripeError) -> Iterator[str]:
    """The message, then every other text field of the error (strings and lists of them)."""
    inner = _inner(err)
    message = inner.get("message")
    yield message if isinstance(message, str) else (err.user_message or str(err))
    for key, value in inner.items():
        if key in _NOT_NAMES or key == "message":
            continue
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            yield from (v for v in value if isinstance(v, str))
