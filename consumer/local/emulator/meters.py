"""v1 billing meters: parameter checks, the object shape (STRIPE_FACTS §4) and list paging.

Not thread-safe on its own; :class:`consumer.local.emulator.state.State` calls it under its lock.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from consumer.local.emulator.errors import v1_error
from consumer.local.emulator.paging import list_object, paginate

FORMULAS = ("sum", "count", "last")
TIME_WINDOWS = ("hour", "day")
_CREATE_KEYS = {
    "display_name": None,
    "event_name": None,
    "event_time_window": None,
    "default_aggregation": {"formula"},
    "customer_mapping": {"event_payload_key", "type"},
    "value_settings": {"event_payload_key"},
}


@dataclass
class Meter:
    """A meter; ``event_name`` ties stream events to it."""

    id: str
    display_name: str
    event_name: str
    formula: str
    customer_key: str
    value_key: str
    event_time_window: str | None
    created: int
    updated: int
    status: str = "active"
    deactivated_at: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``billing.meter`` object."""
        return {
            "id": self.id,
            "object": "billing.meter",
            "created": self.created,
            "customer_mapping": {"event_payload_key": self.customer_key, "type": "by_id"},
            "default_aggregation": {"formula": self.formula},
            "display_name": self.display_name,
            "event_name": self.event_name,
            "event_time_window": self.event_time_window,
            "livemode": False,
            "status": self.status,
            "status_transitions": {"deactivated_at": self.deactivated_at},
            "updated": self.updated,
            "value_settings": {"event_payload_key": self.value_key},
        }


def _check_known(params: Mapping[str, object], allowed: Mapping[str, set[str] | None]) -> None:
    """Stripe rejects unknown parameters; so do we, to catch client typos early."""
    for key, value in params.items():
        if key == "expand":
            continue
        if key not in allowed:
            raise v1_error(400, f"Received unknown parameter: {key}", param=key)
        nested = allowed[key]
        if nested is None and isinstance(value, dict):
            raise v1_error(400, f"Invalid string: {key}", param=key)
        if nested is not None:
            if not isinstance(value, dict):
                raise v1_error(400, f"Invalid object: {key}", param=key)
            for sub in value:
                if sub not in nested:
                    param = f"{key}[{sub}]"
                    raise v1_error(400, f"Received unknown parameter: {param}", param=param)


def _text(params: Mapping[str, object], key: str, sub: str | None = None) -> str | None:
    value = params.get(key)
    param = key
    if sub is not None:
        value = value.get(sub) if isinstance(value, dict) else None
        param = f"{key}[{sub}]"
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise v1_error(400, f"Invalid string: {param}", param=param)
    return value


def _required(params: Mapping[str, object], key: str, sub: str | None = None) -> str:
    value = _text(params, key, sub)
    if value is None:
        param = key if sub is None else f"{key}[{sub}]"
        raise v1_error(400, f"Missing required param: {param}.", param=param)
    return value


def _choice(value: str | None, allowed: tuple[str, ...], param: str) -> None:
    if value is not None and value not in allowed:
        raise v1_error(400, f"Invalid {param}: must be one of {', '.join(allowed)}", param=param)


class MeterBook:
    """All meters, oldest first; lists are answered newest first like Stripe's."""

    def __init__(self) -> None:
        self._meters: dict[str, Meter] = {}

    def create(self, params: Mapping[str, object], now: int) -> Meter:
        """Check and store a new meter; event names are unique across all meters."""
        _check_known(params, _CREATE_KEYS)
        display_name = _required(params, "display_name")
        event_name = _required(params, "event_name")
        formula = _required(params, "default_aggregation", "formula")
        _choice(formula, FORMULAS, "default_aggregation[formula]")
        window = _text(params, "event_time_window")
        _choice(window, TIME_WINDOWS, "event_time_window")
        _choice(_text(params, "customer_mapping", "type"), ("by_id",), "customer_mapping[type]")
        if len(event_name) > 100:
            raise v1_error(400, "event_name is longer than 100 characters", param="event_name")
        if any(m.event_name == event_name for m in self._meters.values()):
            message = f"A meter with event_name '{event_name}' already exists."
            raise v1_error(400, message, param="event_name")
        meter = Meter(
            id=f"mtr_test_{secrets.token_hex(12)}",
            display_name=display_name,
            event_name=event_name,
            formula=formula,
            customer_key=_text(params, "customer_mapping", "event_payload_key")
            or "stripe_customer_id",
            value_key=_text(params, "value_settings", "event_payload_key") or "value",
            event_time_window=window,
            created=now,
            updated=now,
        )
        self._meters[meter.id] = meter
        return meter

    def get(self, meter_id: str) -> Meter:
        """The meter or a v1 404."""
        meter = self._meters.get(meter_id)
        if meter is None:
            message = f"No such billing meter: '{meter_id}'"
            raise v1_error(404, message, param="id", code="resource_missing")
        return meter

    def all(self) -> list[Meter]:
        """Every meter, oldest first."""
        return list(self._meters.values())

    def active_for(self, event_name: str) -> Meter | None:
        """The active meter that owns ``event_name``, if any."""
        for meter in self._meters.values():
            if meter.event_name == event_name and meter.status == "active":
                return meter
        return None

    def update(self, meter_id: str, params: Mapping[str, object], now: int) -> Meter:
        """Only ``display_name`` may change after creation."""
        meter = self.get(meter_id)
        _check_known(params, {"display_name": None})
        display_name = _text(params, "display_name")
        if display_name is not None:
            meter.display_name = display_name
            meter.updated = now
        return meter

    def set_active(self, meter_id: str, active: bool, now: int) -> Meter:
        """Deactivate or reactivate; asking for the current status again is a 400."""
        meter = self.get(meter_id)
        wanted = "active" if active else "inactive"
        if meter.status == wanted:
            raise v1_error(400, f"This meter is already {wanted}.", param="id")
        meter.status = wanted
        meter.deactivated_at = None if active else now
        meter.updated = now
        return meter

    def list(self, params: Mapping[str, object]) -> dict[str, Any]:
        """GET /v1/billing/meters with ``status`` filter and cursor paging."""
        status = params.get("status")
        if status is not None and status not in ("active", "inactive"):
            raise v1_error(400, "Invalid status: must be active or inactive", param="status")
        meters = [m for m in reversed(self.all()) if status is None or m.status == status]
        page, has_more = paginate(meters, lambda m: m.id, params)
        return list_object("/v1/billing/meters", [m.to_json() for m in page], has_more)
