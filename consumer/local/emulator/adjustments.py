"""Meter event adjustments (cancel by identifier), shared by the v1 form and v2 JSON endpoints."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from consumer.local.emulator.errors import EmulatorError, v1_error, v2_error
from consumer.local.emulator.formats import format_rfc3339

CANCEL_WINDOW_SECONDS = 86400.0


def invalid(message: str, v2: bool, param: str = "cancel[identifier]") -> EmulatorError:
    """v2 uses the documented ``invalid_cancel_configuration`` code; v1 a plain 400."""
    if v2:
        return v2_error(400, message, code="invalid_cancel_configuration")
    return v1_error(400, message, param=param)


def _text(value: object, param: str, v2: bool) -> str:
    if not isinstance(value, str) or not value:
        if v2:
            code = "parameter_missing" if value is None else "parameter_invalid"
            raise v2_error(400, f"{param} is required and must be a string", code=code)
        raise v1_error(400, f"Missing required param: {param}.", param=param)
    return value


def parse_cancel(params: Mapping[str, object], v2: bool) -> tuple[str, str]:
    """``(event_name, identifier)`` from ``event_name``, ``type=cancel``, ``cancel.identifier``."""
    event_name = _text(params.get("event_name"), "event_name", v2)
    kind = params.get("type", "cancel")
    if kind != "cancel":
        raise invalid("type must be cancel", v2, param="type")
    cancel = params.get("cancel")
    identifier = cancel.get("identifier") if isinstance(cancel, dict) else None
    return event_name, _text(identifier, "cancel[identifier]", v2)


def adjustment_json(event_name: str, identifier: str, now: float, v2: bool) -> dict[str, Any]:
    """The completed adjustment object (STRIPE_FACTS §6); cancellation here is immediate."""
    body: dict[str, Any] = {
        "object": "billing.meter_event_adjustment",
        "cancel": {"identifier": identifier},
        "event_name": event_name,
        "livemode": False,
        "status": "complete",
        "type": "cancel",
    }
    if v2:
        body["object"] = "v2.billing.meter_event_adjustment"
        body["id"] = f"mtradj_test_{secrets.token_hex(12)}"
        body["created"] = format_rfc3339(now)
    return body
