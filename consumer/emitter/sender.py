"""Sends one request of at most 100 meter events and learns exactly which were delivered.

A 2xx delivers the whole request. A duplicate-identifier 400 means some events were already
delivered: the request is split down to single events, and a single duplicate counts as
delivered. 429, 5xx and connection errors back off with jitter; session expiry refreshes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import stripe

from consumer.clock import Clock
from consumer.emitter.outbox import Push
from consumer.emitter.ratelimit import TokenBucket
from consumer.emitter.session import SessionKeeper, stripe_client
from consumer.metrics import Metrics
from consumer.sink import exact

log = logging.getLogger(__name__)
EXPIRED_CODE = "billing_meter_event_session_expired"
DUPLICATE_CODES = frozenset({"duplicate_meter_event", "duplicate_identifier"})


class SendFailed(Exception):
    """Retries ran out on a transient error; the pushes stay pending for the next cycle."""


def rfc3339(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    )


def to_event(p: Push) -> dict[str, Any]:
    return {
        "event_name": p.stripe_event_name,
        "identifier": p.identifier,
        "timestamp": rfc3339(p.timestamp_ms),
        "payload": {"stripe_customer_id": p.customer_id, "value": exact(p.value)},
    }


def _code(err: stripe.StripeError) -> str | None:
    if err.code:
        return str(err.code)
    body = err.json_body if isinstance(err.json_body, dict) else {}
    inner = body.get("error") if isinstance(body.get("error"), dict) else {}
    code = inner.get("code") if isinstance(inner, dict) else None
    return str(code) if code else None


def _retry_after(err: stripe.StripeError) -> float | None:
    headers = err.headers or {}
    value: str | None = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Sender:
    def __init__(
        self,
        sessions: SessionKeeper,
        base_addresses: dict[str, str],
        clock: Clock,
        limiter: TokenBucket,
        metrics: Metrics,
        max_retries: int,
        rng: random.Random | None = None,
    ) -> None:
        self._sessions = sessions
        self._bases = base_addresses
        self._clock = clock
        self._limiter = limiter
        self._metrics = metrics
        self._max_retries = max_retries
        self._rng = rng or random.Random()
        self._clients: dict[str, stripe.StripeClient] = {}

    @property
    def api(self) -> stripe.StripeClient:
        """The secret-key client, for the v1 reads that check delivery."""
        return self._sessions.api

    def pace(self) -> None:
        """Wait for a request slot: reads share the stream's rate limit."""
        self._metrics.stripe_rate_wait.inc(self._limiter.acquire())

    def send(self, pushes: Sequence[Push]) -> list[Push]:
        """Deliver `pushes`; returns those Stripe now holds (all of them unless it raises)."""
        try:
            self._post(pushes)
        except stripe.InvalidRequestError as exc:
            if _code(exc) not in DUPLICATE_CODES:
                raise
            if len(pushes) == 1:
                self._metrics.stripe_requests.labels("duplicate").inc()
                return list(pushes)
            mid = len(pushes) // 2
            return self.send(pushes[:mid]) + self.send(pushes[mid:])
        return list(pushes)

    def _post(self, pushes: Sequence[Push]) -> None:
        events = [to_event(p) for p in pushes]
        attempt = 0
        while True:
            token = self._sessions.token()
            self._metrics.stripe_rate_wait.inc(self._limiter.acquire())
            try:
                params: Any = {"events": events}
                self._client(token).v2.billing.meter_event_stream.create(params)
                self._metrics.stripe_requests.labels("200").inc()
                return
            except stripe.TemporarySessionExpiredError:
                self._metrics.stripe_requests.labels("session_expired").inc()
                self._sessions.expired(token)
                continue
            except stripe.AuthenticationError as exc:
                if _code(exc) != EXPIRED_CODE:
                    raise
                self._metrics.stripe_requests.labels("session_expired").inc()
                self._sessions.expired(token)
                continue
            except (stripe.RateLimitError, stripe.APIError, stripe.APIConnectionError) as exc:
                status = str(exc.http_status or type(exc).__name__)
                self._metrics.stripe_requests.labels(status).inc()
                attempt += 1
                if attempt > self._max_retries:
                    raise SendFailed(f"gave up after {attempt} attempts: {status}") from exc
                self._clock.sleep(self._backoff(attempt, _retry_after(exc)))
            except stripe.InvalidRequestError as exc:
                self._metrics.stripe_requests.labels(str(exc.http_status or 400)).inc()
                raise

    def _backoff(self, attempt: int, hint: float | None) -> float:
        base = min(30.0, 0.25 * 2.0 ** (attempt - 1))
        delay = base * self._rng.uniform(0.5, 1.0)
        return max(delay, hint or 0.0)

    def _client(self, token: str) -> stripe.StripeClient:
        client = self._clients.get(token)
        if client is None:
            self._clients = {token: stripe_client(token, self._bases)}
            client = self._clients[token]
        return client
