"""The instants operator commands take: RFC 3339 with a zone, or epoch seconds."""

from __future__ import annotations

from datetime import datetime


def parse_instant(text: str) -> float:
    """Epoch seconds from RFC 3339 (a zone required: a bare local time would bill the wrong
    hour on a host in another zone) or from epoch seconds; ValueError says what was wrong."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text!r} (RFC 3339 or epoch seconds)") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{text!r} needs a time zone (e.g. Z)")
    return parsed.timestamp()
