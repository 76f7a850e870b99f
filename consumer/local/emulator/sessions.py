"""Meter event sessions: short-lived tokens that authenticate the stream (STRIPE_FACTS §1-2).

Not thread-safe on its own; :class:`consumer.local.emulator.state.State` calls it under its lock.
"""

from __future__ import annotations

import secrets
from typing import Any

from consumer.local.emulator import errors
from consumer.local.emulator.formats import format_rfc3339


class SessionBook:
    """Token to expiry time; expired tokens stay known so they answer "expired", not "unknown"."""

    def __init__(self) -> None:
        self._expiry: dict[str, float] = {}

    def create(self, now: float, lifetime: float) -> dict[str, Any]:
        """A new ``v2.billing.meter_event_session`` object."""
        token = f"mes_tok_{secrets.token_hex(16)}"
        self._expiry[token] = now + lifetime
        return {
            "id": f"mes_{secrets.token_hex(12)}",
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": format_rfc3339(now),
            "expires_at": format_rfc3339(now + lifetime),
            "livemode": False,
        }

    def expire_all(self, now: float) -> int:
        """Expire every live token at once; returns how many were live."""
        live = [token for token, expires in self._expiry.items() if expires > now]
        for token in live:
            self._expiry[token] = now
        return len(live)

    def check(self, token: str, now: float) -> None:
        """401 ``invalid_request_error`` for an unknown token, the documented 401 once expired."""
        expires = self._expiry.get(token)
        if expires is None:
            raise errors.v2_error(401, "Invalid session token provided", code="invalid_api_key")
        if now >= expires:
            raise errors.session_expired()
