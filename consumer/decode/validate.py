"""Validate stage: a decoded event against the meters configuration.

Only permanent problems are reported here; each becomes a dead letter with its reason.
Time checks use the Kafka record timestamp, never the wall clock (P1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from consumer.config import MeterConfig
from consumer.decode.event import DecodedEvent

MAX_ID_LENGTH = 200
DAY_MS = 86_400_000


class Invalid(Exception):
    """A permanent validation failure; `reason` is a short, bounded label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    future_tolerance_ms: int = 300_000
    max_past_ms: int = 35 * DAY_MS


def validate(
    event: DecodedEvent, record_ts_ms: int, meters: Mapping[str, MeterConfig], limits: Limits
) -> MeterConfig:
    """Return the event's meter, or raise Invalid."""
    meter = meters.get(event.event_name)
    if meter is None:
        raise Invalid("unknown_meter", f"no meter for event_name {event.event_name[:100]!r}")
    _check_id("event_id", event.event_id)
    _check_id("customer_id", event.customer_id)
    if event.cancels:
        _check_id("cancels", event.cancels)
        if event.cancels == event.event_id:
            raise Invalid("cancels_itself", "an event cannot cancel itself")
    value = event.value
    if not value.is_finite():
        raise Invalid("value_not_finite", "value is NaN or infinite")
    if value < 0:
        raise Invalid("negative_value", f"value {value} is negative")
    if value > meter.max_value:
        raise Invalid(
            "value_too_large", f"value {value} exceeds {meter.name} max {meter.max_value}"
        )
    if event.timestamp_ms > record_ts_ms + limits.future_tolerance_ms:
        raise Invalid("timestamp_in_future", "event time is ahead of the record time")
    if event.timestamp_ms < record_ts_ms - limits.max_past_ms:
        raise Invalid("timestamp_too_old", "event time is before the accepted past window")
    return meter


def _check_id(name: str, value: str) -> None:
    if not value or not value.strip():
        raise Invalid(f"missing_{name}", f"{name} is empty")
    if len(value) > MAX_ID_LENGTH:
        raise Invalid(f"{name}_too_long", f"{name} longer than {MAX_ID_LENGTH}")
