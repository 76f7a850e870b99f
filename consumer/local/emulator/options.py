"""Emulator knobs, and the checked way to change them at runtime (POST /_emulator/config)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

DuplicateAnswer = Literal["drop", "reject_event", "reject_request"]
DUPLICATE_ANSWERS: tuple[str, ...] = ("drop", "reject_event", "reject_request")
DuplicateNames = Literal["all", "first", "none"]
DUPLICATE_NAMES: tuple[str, ...] = ("all", "first", "none")
_RATES = ("rate_429", "rate_5xx", "drop_rate", "reset_rate")


@dataclass
class EmulatorOptions:
    """How the emulator behaves; every field can be changed while it runs.

    ``duplicate_answer`` exists because Stripe has been seen both dropping a repeated
    identifier silently and answering 400 with ``Stripe-Should-Retry: false``; clients must
    survive either. ``duplicate_names`` is how many repeated identifiers that 400 names:
    the one answer seen in the field names one ("An event already exists with identifier
    <id>."), and nothing documents that it names them all, so clients must cope with every
    form. ``idempotency`` answers a repeated ``Idempotency-Key`` whose first request
    succeeded from a cache for 24 hours, without storing anything again (Stripe's API v2
    overview: a request already processed is not repeated); on, as Stripe documents for
    every POST. ``drop_rate`` loses that fraction of accepted stream events after a 200,
    so reconciliation against event summaries has something to find. ``unknown_customers``
    (comma-separated ids) are customers the account does not hold: their events are answered
    200 and then rejected in the error-report feed, as Stripe does. ``reset_rate`` resets
    that fraction of stream connections after the events were stored, before any answer:
    the client cannot tell whether they landed. ``latency_seconds`` is a mean: each answer
    waits between half and one and a half times it, so concurrent requests finish out of
    order. ``whole_values_only`` refuses (asynchronously, ``meter_event_invalid_value``) any
    value with a fraction, as Stripe's docs word the rule; by default decimals of at most 15
    significant digits pass, as API versions since 2026-04-22 accept.
    """

    token_lifetime_seconds: float = 900.0
    rate_429: float = 0.0
    rate_5xx: float = 0.0
    latency_seconds: float = 0.0
    duplicate_answer: DuplicateAnswer = "drop"
    duplicate_names: DuplicateNames = "all"
    idempotency: bool = True
    dedup_window_seconds: float = 86400.0
    seed: int = 0
    verbose: bool = False
    drop_rate: float = 0.0
    unknown_customers: str = ""
    reset_rate: float = 0.0
    whole_values_only: bool = False

    def customers_unknown(self) -> frozenset[str]:
        return frozenset(c.strip() for c in self.unknown_customers.split(",") if c.strip())


def _coerce(name: str, current: object, raw: object) -> object:
    """Convert ``raw`` (JSON value or form string) to the type of the field's current value."""
    if isinstance(current, bool):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise ValueError(f"{name} must be a boolean")
    if isinstance(current, int):
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise ValueError(f"{name} must be an integer")
        return int(raw)
    if isinstance(current, float):
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ValueError(f"{name} must be a number")
        return float(raw)
    if not isinstance(raw, str):
        raise ValueError(f"{name} must be a string")
    return raw


def _check(options: EmulatorOptions) -> None:
    """Reject values that would make the emulator misbehave instead of failing loudly."""
    for name in _RATES:
        rate = cast(float, getattr(options, name))
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1")
    if options.duplicate_answer not in DUPLICATE_ANSWERS:
        raise ValueError(f"duplicate_answer must be one of {', '.join(DUPLICATE_ANSWERS)}")
    if options.duplicate_names not in DUPLICATE_NAMES:
        raise ValueError(f"duplicate_names must be one of {', '.join(DUPLICATE_NAMES)}")
    for name in ("token_lifetime_seconds", "latency_seconds", "dedup_window_seconds"):
        if cast(float, getattr(options, name)) < 0:
            raise ValueError(f"{name} must not be negative")


def apply_changes(options: EmulatorOptions, changes: Mapping[str, object]) -> EmulatorOptions:
    """Return a copy of ``options`` with ``changes`` applied; ValueError names a bad field."""
    known = {f.name for f in dataclasses.fields(EmulatorOptions)}
    updates: dict[str, object] = {}
    for name, raw in changes.items():
        if name not in known:
            raise ValueError(f"unknown option: {name}")
        try:
            updates[name] = _coerce(name, getattr(options, name), raw)
        except ValueError as exc:
            message = str(exc) if str(exc).startswith(name) else f"{name} has a bad value: {raw!r}"
            raise ValueError(message) from exc
    updated = dataclasses.replace(options, **updates)  # type: ignore[arg-type]
    _check(updated)
    return updated
