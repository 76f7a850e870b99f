"""Everything the emulator remembers, behind one lock, with time taken from an injected clock.

Each public method is one API operation: it takes already-decoded parameters, returns the JSON
body of a success and raises :class:`~consumer.local.emulator.errors.EmulatorError` for an error, so
unit tests exercise the Stripe rules without HTTP.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from consumer.local.emulator import errors
from consumer.local.emulator.adjustments import (
    CANCEL_WINDOW_SECONDS,
    adjustment_json,
    invalid,
    parse_cancel,
)
from consumer.local.emulator.aggregate import aggregate, effective, event_summaries
from consumer.local.emulator.events import (
    IncomingEvent,
    Problem,
    StoredEvent,
    parse_stream_body,
    validate,
)
from consumer.local.emulator.formats import format_decimal
from consumer.local.emulator.meters import Meter, MeterBook
from consumer.local.emulator.options import EmulatorOptions, apply_changes
from consumer.local.emulator.reports import ErrorReport, list_reports, new_report
from consumer.local.emulator.sessions import SessionBook

__all__ = ["EmulatorOptions", "State"]


def _dropped(event: IncomingEvent, meter: Meter, value: Decimal) -> dict[str, str]:
    """What a test needs to know of an event lost after its 200."""
    return {
        "identifier": event.identifier,
        "event_name": event.event_name,
        "customer": event.payload[meter.customer_key],
        "timestamp": str(int(event.timestamp)),
        "value": format_decimal(value),
    }


class State:
    """The emulated Stripe account. ``clock`` returns epoch seconds; tests pass a fake one."""

    def __init__(self, clock: Callable[[], float], options: EmulatorOptions | None = None) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._options = options or EmulatorOptions()
        self._random = random.Random(self._options.seed)
        self._offset = 0.0
        self._sessions = SessionBook()
        self._meters = MeterBook()
        self._events: dict[str, list[StoredEvent]] = defaultdict(list)
        self._seen: dict[str, float] = {}
        # Idempotency-Key -> (hash of the body, when its request succeeded), oldest first.
        self._keys: dict[str, tuple[str, float]] = {}
        self._by_identifier: dict[str, StoredEvent] = {}
        self._reports: list[ErrorReport] = []
        self._counts: Counter[str] = Counter()
        self._by_status: Counter[str] = Counter()
        self._order = 0
        self._children: dict[str, State] = {}  # connected accounts (Stripe Connect)
        self._dropped: list[dict[str, str]] = []  # lost after a 200 (drop_rate), for tests
        self._expiries = 0  # how many times every session was expired (children follow)

    # -- time and knobs -------------------------------------------------------------------

    def now(self) -> float:
        """The emulator's time: the injected clock plus the offset set by tests."""
        return self._clock() + self._offset

    @property
    def options(self) -> EmulatorOptions:
        """A copy, so callers cannot change knobs behind the lock's back."""
        with self._lock:
            return dataclasses.replace(self._options)

    def configure(self, changes: Mapping[str, object]) -> EmulatorOptions:
        """Change knobs at runtime; a new ``seed`` restarts the fault sequence."""
        with self._lock:
            try:
                updated = apply_changes(self._options, changes)
            except ValueError as exc:
                raise errors.v1_error(400, str(exc)) from None
            if "seed" in changes:
                self._random = random.Random(updated.seed)
            self._options = updated
            return dataclasses.replace(updated)

    def set_clock_offset(self, seconds: float) -> float:
        """Jump the emulator's time by ``seconds`` from the injected clock; returns the new now."""
        with self._lock:
            self._offset = float(seconds)
            return self.now()

    @property
    def clock_offset(self) -> float:
        """The current offset in seconds."""
        return self._offset

    # -- connected accounts ---------------------------------------------------------------

    def account(self, account: str) -> State:
        """The connected account `account` (the Stripe-Account header), or this one for "".
        A connected account has its own meters, events, sessions and identifiers; it shares
        its platform's knobs, clock and session expiries, so tests set them once."""
        if not account:
            return self
        with self._lock:
            child = self._children.get(account)
            if child is None:
                child = self._children[account] = State(self.now, self._options)
            options, expiries = self._options, self._expiries
        child._follow(options, expiries)
        return child

    def _follow(self, options: EmulatorOptions, expiries: int) -> None:
        with self._lock:
            if options != self._options:
                self._options = dataclasses.replace(options)
            if expiries > self._expiries:
                self._expiries = expiries
                self._sessions.expire_all(self.now())

    # -- sessions -------------------------------------------------------------------------

    def create_session(self) -> dict[str, Any]:
        """POST /v2/billing/meter_event_session (the caller has checked the API key)."""
        with self._lock:
            return self._sessions.create(self.now(), self._options.token_lifetime_seconds)

    def expire_sessions(self) -> int:
        """Expire every live token at once; returns how many were live."""
        with self._lock:
            self._expiries += 1
            return self._sessions.expire_all(self.now())

    # -- the stream -----------------------------------------------------------------------

    def stream(self, token: str, body: object, idempotency_key: str = "") -> dict[str, Any]:
        """POST /v2/billing/meter_event_stream: latency, faults, token, idempotency, shape,
        duplicates, store.

        Faults come before the token check, as a rate limiter in front of the API would. A
        key whose request succeeded is answered as it was, storing nothing; a key whose
        request failed runs again (v2 retries failed work), and a key reused with another
        body is refused.
        """
        latency = self.options.latency_seconds
        if latency > 0:
            with self._lock:
                spread = 0.5 + self._random.random()
            time.sleep(latency * spread)
        with self._lock:
            self._inject_fault()
            self._sessions.check(token, self.now())
            now = self.now()
            self._forget(now)
            digest = ""
            if idempotency_key and self._options.idempotency:
                digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
                if self._replayed(idempotency_key, digest):
                    return {}
            incoming = parse_stream_body(body, now)
            fresh, repeated = self._split_duplicates(incoming, now)
            self._counts["duplicates"] += len(repeated)
            answer, names = self._options.duplicate_answer, self._options.duplicate_names
            if repeated and answer == "reject_request":
                self._counts["duplicate_requests"] += 1
                raise errors.duplicates(repeated, names)
            self._accept(fresh, now)
            if repeated and answer == "reject_event":
                self._counts["duplicate_requests"] += 1
                raise errors.duplicates(repeated, names)
            if digest:
                self._keys[idempotency_key] = (digest, now)
            return {}

    def _replayed(self, key: str, digest: str) -> bool:
        """Whether `key` already succeeded with this body (answer it from the cache)."""
        saved = self._keys.get(key)
        if saved is None:
            return False
        if saved[0] != digest:
            raise errors.idempotency_mismatch(key)
        self._counts["idempotent_replays"] += 1
        return True

    def reset_answer(self) -> bool:
        """Whether to reset this stream connection instead of answering (after storing)."""
        with self._lock:
            rate = self._options.reset_rate
            return rate > 0 and self._random.random() < rate

    def _inject_fault(self) -> None:
        """Draw from the seeded generator only for knobs that are on, so runs stay repeatable."""
        options = self._options
        if options.rate_429 > 0 and self._random.random() < options.rate_429:
            raise errors.rate_limited()
        if options.rate_5xx > 0 and self._random.random() < options.rate_5xx:
            raise errors.server_error()

    def _forget(self, now: float) -> None:
        """Drop identifiers first stored a dedup window or more ago: Stripe keeps them for 24
        hours only, so a copy sent later is billed again (the danger clients must avoid).

        ``_seen`` is in first-receipt order, so the scan stops at the first one still
        remembered; an identifier stored again after it was forgotten moves to the end.
        """
        window = self._options.dedup_window_seconds
        while self._keys:  # idempotency keys are pruned after 24 hours too
            key, (_, stored) = next(iter(self._keys.items()))
            if now - stored < window:
                break
            del self._keys[key]
        while self._seen:
            identifier, seen = next(iter(self._seen.items()))
            if now - seen < window:
                return
            del self._seen[identifier]

    def _split_duplicates(
        self, incoming: list[IncomingEvent], now: float
    ) -> tuple[list[IncomingEvent], list[str]]:
        """Identifiers are unique per account over the dedup window, and within one request."""
        window = self._options.dedup_window_seconds
        fresh: list[IncomingEvent] = []
        repeated: list[str] = []
        in_request: set[str] = set()
        for event in incoming:
            seen = self._seen.get(event.identifier)
            if event.identifier in in_request or (seen is not None and now - seen < window):
                repeated.append(event.identifier)
            else:
                in_request.add(event.identifier)
                fresh.append(event)
        return fresh, repeated

    def _accept(self, incoming: list[IncomingEvent], now: float) -> None:
        """Run the asynchronous checks at once; failures go to the report feed only."""
        failures: list[tuple[str, Problem]] = []
        unknown = self._options.customers_unknown()
        for event in incoming:
            meter = self._meters.active_for(event.event_name)
            outcome = validate(event, meter, now, unknown, self._options.whole_values_only)
            if isinstance(outcome, Problem):
                failures.append((event.identifier, outcome))
                continue
            drop = self._options.drop_rate
            if drop > 0 and self._random.random() < drop:
                self._counts["events_dropped"] += 1
                self._dropped.append(_dropped(event, *outcome))
                continue
            self._store(event, *outcome, now)
        if failures:
            self._counts["events_rejected_async"] += len(failures)
            self._reports.append(new_report(failures, now))

    def _store(self, event: IncomingEvent, meter: Meter, value: Decimal, now: float) -> None:
        self._order += 1
        stored = StoredEvent(
            meter_id=meter.id,
            event_name=event.event_name,
            customer=event.payload[meter.customer_key],
            value=value,
            timestamp=event.timestamp,
            identifier=event.identifier,
            received_at=now,
            order=self._order,
        )
        self._events[meter.id].append(stored)
        self._seen.pop(event.identifier, None)  # keep first-receipt order for _forget
        self._seen[event.identifier] = now
        self._by_identifier[event.identifier] = stored
        self._counts["events_accepted"] += 1

    def error_reports(self, params: Mapping[str, object]) -> dict[str, Any]:
        """GET /v2/core/events (see :mod:`consumer.local.emulator.reports` for the shape)."""
        with self._lock:
            return list_reports(self._reports, params)

    # -- adjustments ----------------------------------------------------------------------

    def cancel_event(self, params: Mapping[str, object], *, v2: bool) -> dict[str, Any]:
        """Cancel an accepted event by identifier within 24 hours of its receipt."""
        event_name, identifier = parse_cancel(params, v2)
        with self._lock:
            now = self.now()
            event = self._by_identifier.get(identifier)
            if event is None or event.event_name != event_name:
                raise invalid(f"No meter event '{identifier}' for '{event_name}'", v2)
            if now - event.received_at > CANCEL_WINDOW_SECONDS:
                raise invalid(f"Meter event '{identifier}' was received over 24 hours ago", v2)
            event.cancelled = True
            return adjustment_json(event_name, identifier, now, v2)

    # -- meters ---------------------------------------------------------------------------

    def create_meter(self, params: Mapping[str, object]) -> dict[str, Any]:
        """POST /v1/billing/meters."""
        with self._lock:
            return self._meters.create(params, int(self.now())).to_json()

    def retrieve_meter(self, meter_id: str) -> dict[str, Any]:
        """GET /v1/billing/meters/{id}."""
        with self._lock:
            return self._meters.get(meter_id).to_json()

    def update_meter(self, meter_id: str, params: Mapping[str, object]) -> dict[str, Any]:
        """POST /v1/billing/meters/{id}."""
        with self._lock:
            return self._meters.update(meter_id, params, int(self.now())).to_json()

    def set_meter_active(self, meter_id: str, active: bool) -> dict[str, Any]:
        """POST /v1/billing/meters/{id}/deactivate or /reactivate."""
        with self._lock:
            return self._meters.set_active(meter_id, active, int(self.now())).to_json()

    def list_meters(self, params: Mapping[str, object]) -> dict[str, Any]:
        """GET /v1/billing/meters."""
        with self._lock:
            return self._meters.list(params)

    def event_summaries(self, meter_id: str, params: Mapping[str, object]) -> dict[str, Any]:
        """GET /v1/billing/meters/{id}/event_summaries."""
        with self._lock:
            meter = self._meters.get(meter_id)
            return event_summaries(meter, self._events[meter_id], params)

    # -- observation ----------------------------------------------------------------------

    def record_request(self, kind: str | None, status: int) -> None:
        """Count one answered request; ``kind`` is "stream", "session" or None."""
        with self._lock:
            if kind is not None:
                self._counts[f"requests_{kind}"] += 1
            self._by_status[str(status)] += 1

    def stored_events(self) -> list[StoredEvent]:
        """Copies of every stored event in receipt order (for tests and debugging)."""
        with self._lock:
            every = [e for events in self._events.values() for e in events]
            return [dataclasses.replace(e) for e in sorted(every, key=lambda e: e.order)]

    def _totals(self) -> list[dict[str, str]]:
        rows = []
        for meter in self._meters.all():
            by_customer: dict[str, list[StoredEvent]] = defaultdict(list)
            for event in effective(self._events[meter.id], meter.event_time_window):
                by_customer[event.customer].append(event)
            for customer in sorted(by_customer):
                total = aggregate(meter.formula, by_customer[customer])
                row = {"event_name": meter.event_name, "customer": customer}
                rows.append({**row, "value": format_decimal(total)})
        return rows

    def hourly(self) -> dict[str, Any]:
        """GET /_emulator/hourly: what each meter billed per customer and UTC hour of the
        event timestamps (the chaos harness compares this with ground truth)."""
        with self._lock:
            rows = []
            for meter in self._meters.all():
                groups: dict[tuple[str, int], list[StoredEvent]] = defaultdict(list)
                for event in effective(self._events[meter.id], meter.event_time_window):
                    groups[(event.customer, int(event.timestamp // 3600) * 3600)].append(event)
                for (customer, hour), events in sorted(groups.items()):
                    value = format_decimal(aggregate(meter.formula, events))
                    rows.append(
                        {
                            "event_name": meter.event_name,
                            "customer": customer,
                            "hour": hour,
                            "value": value,
                        }
                    )
            return {"rows": rows}

    def snapshot(self) -> dict[str, Any]:
        """GET /_emulator/state: meters, exact totals per (event_name, customer), counters."""
        with self._lock:
            self._forget(self.now())
            meters = [
                {"id": m.id, "event_name": m.event_name, "formula": m.formula, "status": m.status}
                for m in self._meters.all()
            ]
            counts = self._counts
            return {
                "meters": meters,
                "totals": self._totals(),
                "requests": {
                    "stream": counts["requests_stream"],
                    "session": counts["requests_session"],
                    "by_status": dict(self._by_status),
                },
                "events_accepted": counts["events_accepted"],
                "events_rejected_async": counts["events_rejected_async"],
                "events_dropped": counts["events_dropped"],
                "dropped": list(self._dropped),
                "duplicates": counts["duplicates"],
                "duplicate_requests": counts["duplicate_requests"],
                "idempotent_replays": counts["idempotent_replays"],
                "identifiers_remembered": len(self._seen),
                "clock_offset_seconds": self._offset,
                "accounts": {a: c.snapshot() for a, c in sorted(self._children.items())},
            }
