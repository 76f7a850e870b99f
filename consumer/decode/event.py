"""What the decode stage yields for one message, and how it refuses one."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class DecodedEvent:
    event_id: str
    event_name: str
    customer_id: str
    value: Decimal
    timestamp_ms: int
    properties: dict[str, str]
    schema_id: int  # 0 in plain mode
    cancels: str = ""  # the event_id this event takes back ("" = usage); v4 on


class DecodeError(Exception):
    """A permanent decode failure; `reason` is a short, bounded label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
