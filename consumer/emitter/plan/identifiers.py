"""Deterministic Stripe identifiers: the same usage always gets the same identifier, so a
re-send after a crash is recognised by Stripe's 24-hour identifier dedup."""

from __future__ import annotations

import hashlib

SEPARATOR, ESCAPE = "\x1f", "\x1e"


def _part(part: str) -> str:
    """The part with the separator and the escape escaped, so that the joined parts name
    one tuple only (a separator inside a customer or event id cannot shift a boundary).
    Parts without either control character, all real ones, are unchanged, and so are
    their identifiers."""
    return part.replace(ESCAPE, ESCAPE + ESCAPE).replace(SEPARATOR, ESCAPE + SEPARATOR)


def _digest(*parts: str) -> str:
    h = hashlib.sha256(SEPARATOR.join(map(_part, parts)).encode())
    return h.hexdigest()[:40]


def per_event_identifier(stripe_event_name: str, event_id: str) -> str:
    """hash(meter event name, event id): an event id may repeat across meters."""
    return "uc1e_" + _digest(stripe_event_name, event_id)


def aggregated_identifier(meter: str, customer_id: str, bucket_ms: int, revision: int) -> str:
    """hash(meter, customer, bucket, revision): each revision of a bucket is one push."""
    return "uc1a_" + _digest(meter, customer_id, str(bucket_ms), str(revision))


def repair_identifier(meter: str, customer_id: str, window_start_s: int, n: int) -> str:
    """hash(meter, customer, reconcile window, n): the n-th push repairing what Stripe lost in
    that window (ops/repair.py). Never an earlier push's identifier: Stripe would drop a
    re-sent one as a duplicate for 24 hours."""
    return "uc1r_" + _digest(meter, customer_id, str(window_start_s), str(n))
