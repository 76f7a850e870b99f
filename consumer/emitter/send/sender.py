"""Sends one request of at most 100 meter events and learns exactly which were delivered.

A push is one event, or several when its amount needs more than 15 significant digits
(units.parts); its extra events carry the push's identifier with a part suffix. A 2xx
delivers the whole request. A duplicate-identifier 400 means Stripe already holds some
events: those the answer names (duplicates.py) are delivered, and the rest goes again in one
request. Only when it names none are the request's events isolated: events of pushes whose
earlier send had no answer (sent before this process started, or reset or failed in it) go
one a request, the others together; without such pushes the request is halved. A push is
delivered when all its events are. Every request carries an Idempotency-Key derived from
its content, so a retry after a lost answer is answered from Stripe's idempotency cache, not
with a duplicate 400. 429, 5xx and connection errors back off with jitter; session expiry
refreshes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import stripe

from consumer import crash_points
from consumer.clock import Clock
from consumer.emitter.plan.outbox import Push
from consumer.emitter.plan.units import billed, part_count, parts
from consumer.emitter.send import duplicates
from consumer.emitter.send.ratelimit import TokenBucket
from consumer.emitter.send.session import SessionKeeper, stripe_client
from consumer.emitter.send.trouble import Trouble
from consumer.metrics import Metrics

log = logging.getLogger(__name__)
EXPIRED_CODE = "billing_meter_event_session_expired"
DUPLICATE_CODES = duplicates.DUPLICATE_CODES


class _Events(list[dict[str, Any]]):
    """A request's events, JSON-encoded by the SDK like any list, but form-encoded as one
    field. The SDK form-encodes every request's params, also for v2 calls, whose body is
    JSON and which never use that encoding: for 100 events that took 2.5 of the 3.5 ms of
    CPU a request costs, and at the stream's rates the emitter ran out of interpreter time.
    `_api_encode` (stripe/_encode.py) yields a single field for a value with an `id`."""

    id = None


class SendFailed(Exception):
    """Retries ran out on a transient error; the pushes stay pending for the next cycle."""


class CannotCancel(Exception):
    """Stripe refused to cancel a meter event (past its 24 hours, for one): it bills it."""


class NoSuchEvent(CannotCancel):
    """Stripe has no meter event by an identifier of the push (it lost it after its 200):
    that part was never billed, and the push's other parts were cancelled."""


# Stripe's answer to a cancel naming an identifier it does not hold (the emulator's too),
# and the code Stripe gives any object it does not hold.
_NO_SUCH_EVENT, _MISSING_CODE = "No meter event", "resource_missing"


def rfc3339(ms: int) -> str:
    return f"{_second(ms // 1000)}{ms % 1000:03d}Z"


@functools.lru_cache(maxsize=4096)
def _second(s: int) -> str:
    """Formatting a time is most of an event's cost, and pushes of a batch share seconds."""
    return datetime.fromtimestamp(s, UTC).strftime("%Y-%m-%dT%H:%M:%S.")


PayloadKeys = Mapping[str, tuple[str, str]]  # Stripe event name -> (customer key, value key)
DEFAULT_KEYS = ("stripe_customer_id", "value")


def to_events(p: Push, keys: PayloadKeys | None = None) -> list[dict[str, Any]]:
    """The meter events that send `p`: its amount, split where it has too many digits."""
    customer_key, value_key = (keys or {}).get(p.stripe_event_name, DEFAULT_KEYS)
    values = parts(billed(p), "decimal")
    return [
        {
            "event_name": p.stripe_event_name,
            "identifier": p.identifier if i == 0 else f"{p.identifier}-p{i}",
            "timestamp": rfc3339(p.timestamp_ms),
            "payload": {customer_key: p.customer_id, value_key: v},
        }
        for i, v in enumerate(values)
    ]


def event_count(p: Push) -> int:
    """How many meter events `p` takes in a request."""
    return max(1, part_count(billed(p), "decimal"))


def _retry_after(err: stripe.StripeError) -> float | None:
    headers = err.headers or {}
    value: str | None = headers.get("Retry-After") or headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def backoff_ceiling(attempt: int) -> float:
    """The longest wait before retry `attempt` (1, 2, ...): doubling from 0.25 s to 30 s;
    each wait is this times a jitter of 0.5 to 1 (or longer when Stripe says so)."""
    return min(30.0, 0.25 * 2.0 ** (attempt - 1))


def retry_horizon(max_retries: int) -> float:
    """The longest a request retries before its pushes wait for the next cycle."""
    return sum(backoff_ceiling(a) for a in range(1, max_retries + 1))


def idempotency_key(account: str, events: Sequence[Mapping[str, Any]], attempts: str) -> str:
    """One key per request content: the same events for the same account with the same first
    attempts (`attempts`) get the same key, so every retry of a request, also from a later
    cycle, is recognised. A deliberate re-send (a check found the push absent) carries a
    fresh first attempt, so it is never answered from the cache of the send that was lost."""
    # to_events builds every event's keys in one order, so no sort is needed (it would
    # double the cost, a few percent of a request's CPU).
    body = json.dumps([account, attempts, list(events)], separators=(",", ":"))
    return "ucr_" + hashlib.sha256(body.encode()).hexdigest()[:48]


class _Request:
    """What every request sent for one send() shares: the account, its session keeper, and
    the push each event belongs to (by event identifier, part suffixes included)."""

    def __init__(
        self, account: str, keeper: SessionKeeper, owners: dict[str, Push], uncertain: set[str]
    ) -> None:
        self.account = account
        self.keeper = keeper
        self.owners = owners
        self.uncertain = uncertain  # push identifiers whose earlier send had no answer

    def pushes(self, events: Sequence[Mapping[str, Any]]) -> list[str]:
        return list(dict.fromkeys(self.owners[e["identifier"]].identifier for e in events))

    def key(self, events: Sequence[Mapping[str, Any]]) -> str:
        attempts = ",".join(str(self.owners[e["identifier"]].first_attempt_ms) for e in events)
        return idempotency_key(self.account, events, attempts)

    def isolated(self, events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """The groups to send when a duplicate answer named nothing: each event of an
        uncertain push alone and the others together; with none uncertain, two halves."""
        doubt = [e for e in events if self.owners[e["identifier"]].identifier in self.uncertain]
        if not doubt:
            mid = len(events) // 2
            return [events[:mid], events[mid:]]
        sure = [e for e in events if self.owners[e["identifier"]].identifier not in self.uncertain]
        return ([sure] if sure else []) + [[e] for e in doubt]


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
        keys: PayloadKeys | None = None,
    ) -> None:
        self._keys = dict(keys or {})
        self._sessions = sessions
        self._bases = base_addresses
        self._clock = clock
        self._limiter = limiter
        self._metrics = metrics
        self._max_retries = max_retries
        self._rng = rng or random.Random()
        self._clients: dict[str, stripe.StripeClient] = {}
        self._keepers: dict[str, SessionKeeper] = {"": sessions}
        self._lock = threading.Lock()
        # Pushes first attempted before this process started may already be at Stripe (a
        # crash between the send and its mark); so may those whose request here had no
        # answer. Only their events are isolated when a duplicate answer names nothing.
        self._started_ms = int(clock.now() * 1000)
        self._unanswered: set[str] = set()
        self.trouble = Trouble(clock)

    @property
    def api(self) -> stripe.StripeClient:
        """The secret-key client, for the v1 reads that check delivery."""
        return self._sessions.api

    def pace(self) -> None:
        """Wait for a request slot: reads share the stream's rate limit."""
        self._metrics.stripe_rate_wait.inc(self._limiter.acquire())

    def send(self, pushes: Sequence[Push]) -> list[Push]:
        """Deliver `pushes` (all for one account); returns those Stripe now holds (all of
        them unless it raises)."""
        accounts = {p.account for p in pushes}
        if len(accounts) > 1:
            raise ValueError(f"one request goes to one account, got {sorted(accounts)}")
        account = accounts.pop() if accounts else ""
        crash_points.sending(p.identifier for p in pushes)
        owners: dict[str, Push] = {}
        events: list[dict[str, Any]] = []
        for p in pushes:
            for e in to_events(p, self._keys):
                owners[e["identifier"]] = p
                events.append(e)
        with self._lock:
            uncertain = {
                p.identifier
                for p in pushes
                if 0 < p.first_attempt_ms < self._started_ms or p.identifier in self._unanswered
            }
        self._deliver(_Request(account, self._keeper(account), owners, uncertain), events)
        if uncertain:
            with self._lock:
                self._unanswered.difference_update(uncertain)
        return list(pushes)

    def cancel(self, push: Push) -> None:
        """Cancel every meter event that sent `push`, one adjustment each (idempotent: a
        cancelled event may be cancelled again). Raises NoSuchEvent once every part was
        tried when Stripe held none of some (nothing of the push is billed then),
        CannotCancel when it refused otherwise (it bills that part), or SendFailed."""
        options: Any = {"stripe_account": push.account} if push.account else None
        adjustments = self.api.v2.billing.meter_event_adjustments
        absent: list[str] = []
        for event in to_events(push, self._keys):
            params: Any = {
                "event_name": push.stripe_event_name,
                "type": "cancel",
                "cancel": {"identifier": event["identifier"]},
            }
            attempt = 0
            while True:
                self.pace()
                try:
                    if options:
                        adjustments.create(params, options)
                    else:
                        adjustments.create(params)
                    self._metrics.stripe_requests.labels("200").inc()
                    break
                except stripe.InvalidRequestError as exc:
                    self._metrics.stripe_requests.labels(str(exc.http_status or 400)).inc()
                    message = exc.user_message or str(exc)
                    if not (message.startswith(_NO_SUCH_EVENT) or exc.code == _MISSING_CODE):
                        raise CannotCancel(message) from exc
                    absent.append(event["identifier"])
                    break
                except (stripe.RateLimitError, stripe.APIError, stripe.APIConnectionError) as exc:
                    attempt += 1
                    self._retry_or_fail(exc, attempt)
        if absent:
            raise NoSuchEvent(f"Stripe has no meter event {', '.join(absent)}")

    def _retry_or_fail(self, exc: stripe.StripeError, attempt: int) -> None:
        """Count a transient failure and back off before the next attempt, or give up."""
        status = str(exc.http_status or type(exc).__name__)
        self._metrics.stripe_requests.labels(status).inc()
        self.trouble.note(status)
        if attempt > self._max_retries:
            raise SendFailed(f"gave up after {attempt} attempts: {status}") from exc
        self._clock.sleep(self._backoff(attempt, _retry_after(exc)))

    def _keeper(self, account: str) -> SessionKeeper:
        with self._lock:
            keeper = self._keepers.get(account)
            if keeper is None:
                keeper = self._keepers[account] = self._sessions.for_account(account)
            return keeper

    def _deliver(self, req: _Request, events: list[dict[str, Any]]) -> None:
        """Post `events` until Stripe holds all of them. A duplicate answer's named events
        are delivered and the rest goes again in one request; one that names nothing splits
        the request (`_Request.isolated`); a lone event answered as a duplicate is
        delivered."""
        while events:
            try:
                self._post(req, events)
                return
            except stripe.InvalidRequestError as exc:
                if not duplicates.is_duplicate(exc):
                    raise
                answer = exc
            self._metrics.stripe_duplicate_requests.inc()
            held = duplicates.named(answer, {e["identifier"] for e in events})
            if not held and len(events) == 1:
                held = {events[0]["identifier"]}
            if held:
                self._metrics.stripe_duplicate_events.inc(len(held))
                events = [e for e in events if e["identifier"] not in held]
                continue
            for group in req.isolated(events):
                self._deliver(req, group)
            return

    def _post(self, req: _Request, events: list[dict[str, Any]]) -> None:
        attempt = 0
        options: Any = {"idempotency_key": req.key(events)}
        if req.account:
            options["stripe_account"] = req.account
        while True:
            token = req.keeper.token()
            self._metrics.stripe_rate_wait.inc(self._limiter.acquire())
            try:
                params: Any = {"events": _Events(events)}
                self._client(token).v2.billing.meter_event_stream.create(params, options)
                self._metrics.stripe_requests.labels("200").inc()
                return
            except stripe.TemporarySessionExpiredError:
                self._metrics.stripe_requests.labels("session_expired").inc()
                self.trouble.note("session_expired")
                req.keeper.expired(token)
                continue
            except stripe.AuthenticationError as exc:
                if duplicates.code(exc) != EXPIRED_CODE:
                    raise
                self._metrics.stripe_requests.labels("session_expired").inc()
                self.trouble.note("session_expired")
                req.keeper.expired(token)
                continue
            except (stripe.APIError, stripe.APIConnectionError) as exc:
                # No answer, or a failure after Stripe may have stored the events.
                with self._lock:
                    self._unanswered.update(req.pushes(events))
                attempt += 1
                self._retry_or_fail(exc, attempt)
            except stripe.RateLimitError as exc:
                attempt += 1
                self._retry_or_fail(exc, attempt)
            except stripe.InvalidRequestError as exc:
                self._metrics.stripe_requests.labels(str(exc.http_status or 400)).inc()
                raise

    def _backoff(self, attempt: int, hint: float | None) -> float:
        delay = backoff_ceiling(attempt) * self._rng.uniform(0.5, 1.0)
        return max(delay, hint or 0.0)

    def _client(self, token: str) -> stripe.StripeClient:
        client = self._clients.get(token)
        if client is None:
            if len(self._clients) > 4 * len(self._keepers):  # tokens of expired sessions
                self._clients.clear()
            client = self._clients[token] = stripe_client(token, self._bases)
        return client
