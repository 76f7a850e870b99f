"""Deterministic Stripe identifiers: the same usage always gets the same identifier, so a
re-send after a crash is recognised by Stripe's 24-hour identifier dedup."""

from __future__ import annotations

import hashlib


def _digest(*parts: str) -> str:
    h = hashlib.sha256("\x1f".join(parts).encode())
    return h.hexdigest()[:40]


def per_event_identifier(stripe_event_name: str, event_id: str) -> str:
    """hash(meter event name, event id): an event id may repeat across meters."""
    return "uc1e_" + _digest(stripe_event_name, event_id)


def aggregated_identifier(meter: str, customer_id: str, bucket_ms: int, revision: int) -> str:
    """hash(meter, customer, bucket, revision): each revision of a bucket is one push."""
    return "uc1a_" + _digest(meter, customer_id, str(bucket_ms), str(revision))
