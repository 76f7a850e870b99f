"""Meter events on the stream: synchronous shape checks, then the checks Stripe runs later.

Stripe answers a stream request before it validates the events inside (STRIPE_FACTS §2), so
only malformed JSON shapes are refused inline; meter, customer, value and time problems go to
the error-report feed instead.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from decimal import Decimal

from consumer.local.emulator.errors import EmulatorError, v2_error
from consumer.local.emulator.formats import parse_rfc3339
from consumer.local.emulator.meters import Meter

MAX_EVENTS = 100
MAX_DIGITS = 15
PAST_LIMIT_SECONDS = 35 * 86400.0
FUTURE_LIMIT_SECONDS = 300.0
_EVENT_KEYS = {"event_name", "identifier", "payload", "timestamp"}
_DECIMAL = re.compile(r"^-?\d+(\.\d+)?$")


@dataclass(frozen=True)
class IncomingEvent:
    """One event that passed the shape checks; ``identifier`` is filled in when absent."""

    event_name: str
    identifier: str
    payload: dict[str, str]
    timestamp: float


@dataclass
class StoredEvent:
    """An accepted event as the meter aggregates it."""

    meter_id: str
    event_name: str
    customer: str
    value: Decimal
    timestamp: float
    identifier: str
    received_at: float
    order: int
    cancelled: bool = False


@dataclass(frozen=True)
class Problem:
    """An asynchronous validation failure: the report code and a human message."""

    code: str
    message: str


def _bad(message: str, code: str = "parameter_invalid") -> EmulatorError:
    return v2_error(400, message, code=code)


def _text(event: dict[str, object], key: str, where: str, required: bool) -> str | None:
    value = event.get(key)
    if value is None:
        if required:
            raise _bad(f"{where}.{key} is required", "parameter_missing")
        return None
    if not isinstance(value, str) or not value or len(value) > 100:
        raise _bad(f"{where}.{key} must be a non-empty string of at most 100 characters")
    return value


def _payload(event: dict[str, object], where: str) -> dict[str, str]:
    payload = event.get("payload")
    if payload is None:
        raise _bad(f"{where}.payload is required", "parameter_missing")
    if not isinstance(payload, dict):
        raise _bad(f"{where}.payload must be an object of strings")
    for key, value in payload.items():
        if not isinstance(value, str):
            raise _bad(f"{where}.payload.{key} must be a string, got {type(value).__name__}")
    return dict(payload)


def _timestamp(event: dict[str, object], where: str, now: float) -> float:
    raw = event.get("timestamp")
    if raw is None:
        return now
    if not isinstance(raw, str):
        raise _bad(f"{where}.timestamp must be an RFC 3339 string, got {type(raw).__name__}")
    try:
        return parse_rfc3339(raw)
    except ValueError:
        raise _bad(f"{where}.timestamp must be an RFC 3339 string, got {raw!r}") from None


def _one_event(raw: object, index: int, now: float) -> IncomingEvent:
    where = f"events[{index}]"
    if not isinstance(raw, dict):
        raise _bad(f"{where} must be an object")
    unknown = sorted(set(raw) - _EVENT_KEYS)
    if unknown:
        raise _bad(f"{where} has unknown field(s): {', '.join(unknown)}", "parameter_unknown")
    event_name = _text(raw, "event_name", where, required=True)
    identifier = _text(raw, "identifier", where, required=False)
    return IncomingEvent(
        event_name=event_name or "",
        identifier=identifier or f"emu_{secrets.token_hex(12)}",
        payload=_payload(raw, where),
        timestamp=_timestamp(raw, where, now),
    )


def parse_stream_body(body: object, now: float) -> list[IncomingEvent]:
    """Shape-check ``{"events": [...]}``; any failure refuses the whole request with a 400."""
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object")
    events = body.get("events")
    if events is None:
        raise _bad("events is required", "parameter_missing")
    if not isinstance(events, list):
        raise _bad("events must be an array")
    if not events:
        raise _bad("events must contain at least one event")
    if len(events) > MAX_EVENTS:
        raise _bad(f"events must contain at most {MAX_EVENTS} events, got {len(events)}")
    unknown = sorted(set(body) - {"events"})
    if unknown:
        raise _bad(f"Unknown field(s): {', '.join(unknown)}", "parameter_unknown")
    return [_one_event(raw, index, now) for index, raw in enumerate(events)]


def significant_digits(value: Decimal) -> int:
    """Digits after dropping leading zeros; ``0`` counts as one digit."""
    digits = list(value.as_tuple().digits)
    while digits and digits[0] == 0:
        digits.pop(0)
    return max(1, len(digits))


def parse_value(text: str | None, key: str, whole: bool = False) -> Decimal | Problem:
    """A non-negative decimal string with at most 15 significant digits (and no fraction
    when `whole`)."""
    if text is None:
        return Problem("meter_event_invalid_value", f"payload is missing the value key '{key}'")
    if not _DECIMAL.match(text):
        return Problem("meter_event_invalid_value", f"value {text!r} is not a decimal string")
    value = Decimal(text)
    if value < 0:
        return Problem("meter_event_invalid_value", f"value {text!r} is negative")
    if whole and value != value.to_integral_value():
        return Problem("meter_event_invalid_value", f"value {text!r} is not a whole number")
    if significant_digits(value) > MAX_DIGITS:
        message = f"value {text!r} has more than {MAX_DIGITS} significant digits"
        return Problem("meter_event_value_too_many_digits", message)
    return value


def check_time(timestamp: float, now: float) -> Problem | None:
    """Events must fall within the past 35 days and at most 5 minutes ahead."""
    if now - timestamp > PAST_LIMIT_SECONDS:
        return Problem("timestamp_too_far_in_past", "timestamp is more than 35 days in the past")
    if timestamp - now > FUTURE_LIMIT_SECONDS:
        return Problem("timestamp_in_future", "timestamp is more than 5 minutes in the future")
    return None


def validate(
    event: IncomingEvent,
    meter: Meter | None,
    now: float,
    unknown_customers: frozenset[str] = frozenset(),
    whole: bool = False,
) -> tuple[Meter, Decimal] | Problem:
    """The asynchronous checks: the meter and value when the event is good, else the first
    problem found. ``unknown_customers`` are ids the account does not hold."""
    if meter is None:
        return Problem("no_meter", f"No active meter found for event_name '{event.event_name}'")
    late = check_time(event.timestamp, now)
    if late is not None:
        return late
    if not event.payload.get(meter.customer_key):
        message = f"payload is missing the customer key '{meter.customer_key}'"
        return Problem("meter_event_no_customer_defined", message)
    customer = event.payload[meter.customer_key]
    if customer in unknown_customers:
        return Problem("meter_event_customer_not_found", f"No such customer: '{customer}'")
    if meter.formula == "count" and meter.value_key not in event.payload:
        return meter, Decimal(1)
    value = parse_value(event.payload.get(meter.value_key), meter.value_key, whole)
    return value if isinstance(value, Problem) else (meter, value)
