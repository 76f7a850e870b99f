"""Meter event sessions: a token lives 15 minutes; refresh ahead of expiry and on expiry errors."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import stripe

from consumer import crash_points
from consumer.clock import Clock
from consumer.metrics import Metrics


def stripe_client(
    key: str, base_addresses: dict[str, str], timeout: float | None = None
) -> stripe.StripeClient:
    """A StripeClient aimed at `base_addresses` (Stripe, or the bundled emulator);
    `timeout`: seconds a request may take (the SDK's own default is 80)."""
    bases: Any = base_addresses  # the SDK types this as a private TypedDict
    if timeout is None:
        return stripe.StripeClient(key, base_addresses=bases)
    http = stripe.RequestsClient(timeout=timeout)
    return stripe.StripeClient(key, base_addresses=bases, http_client=http)


class SessionKeeper:
    """Hands out a valid session token; thread-safe, one refresh at a time. A session
    belongs to one account: the platform's, or a connected account's (`account`)."""

    def __init__(
        self,
        api: stripe.StripeClient,
        clock: Clock,
        margin_seconds: float,
        metrics: Metrics,
        on_refresh: Callable[[], None] | None = None,
        account: str = "",
    ) -> None:
        self._api = api
        self._account = account
        self._clock = clock
        self._margin = margin_seconds
        self._metrics = metrics
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        self._on_refresh = on_refresh

    @property
    def api(self) -> stripe.StripeClient:
        return self._api

    def for_account(self, account: str) -> SessionKeeper:
        """A keeper of sessions in connected account `account` (Stripe Connect), made with
        the same key, clock and margin."""
        if account == self._account:
            return self
        return SessionKeeper(
            self._api, self._clock, self._margin, self._metrics, self._on_refresh, account
        )

    def token(self) -> str:
        with self._lock:
            if self._token is None or self._clock.now() >= self._expires_at - self._margin:
                self._refresh("scheduled" if self._token else "start")
            assert self._token is not None
            return self._token

    def expired(self, stale_token: str) -> None:
        """Called on an expiry error: refresh unless another thread already did."""
        with self._lock:
            if self._token == stale_token:
                self._refresh("expired")

    def _refresh(self, cause: str) -> None:
        if self._on_refresh is not None:
            self._on_refresh()
        service = self._api.v2.billing.meter_event_session
        if self._account:
            s = service.create(options={"stripe_account": self._account})
        else:
            s = service.create()
        crash_points.reached("session_refresh")  # Stripe made a session; we never stored it
        self._token = s.authentication_token
        self._expires_at = datetime.fromisoformat(s.expires_at).timestamp()
        self._metrics.stripe_sessions.labels(cause).inc()
