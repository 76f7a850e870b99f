"""The headers linking a re-driven copy to its dead letter, and the re-drive records."""

from __future__ import annotations

from consumer.sinks.side_outputs import REDRIVE_ID, REDRIVE_OF

INTENDED, SENT = 1, 2
STATES = {INTENDED: "intended", SENT: "sent"}

__all__ = ["INTENDED", "REDRIVE_ID", "REDRIVE_OF", "SENT", "STATES"]
