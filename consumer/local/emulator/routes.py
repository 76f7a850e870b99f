"""The route table: which path and method reach which :class:`State` operation.

Stripe API routes check credentials here; control routes under ``/_emulator`` take JSON or
form bodies (the SDK's ``raw_request`` sends forms for non-v2 paths) and need no credentials.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from consumer.local.emulator import errors
from consumer.local.emulator.formats import format_rfc3339, parse_form
from consumer.local.emulator.state import State

API_KEY_PREFIXES = ("sk_test_", "sk_live_", "rk_")


@dataclass(frozen=True)
class Request:
    """What a route needs from an HTTP request."""

    method: str
    path: str
    query: str
    body: bytes
    headers: Mapping[str, str]

    def bearer(self) -> str:
        """The credential from ``Authorization: Bearer ...``, or an empty string."""
        header = self.headers.get("Authorization") or ""
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else ""

    def json(self) -> object:
        """The JSON body; ``None`` when it is not JSON, which the stream checks refuse."""
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            return None

    def form(self) -> dict[str, object]:
        """Bracket-notation parameters from the body (POST) or the query string (GET)."""
        text = self.body.decode(errors="replace") if self.method == "POST" else self.query
        return parse_form(text)

    def control(self) -> dict[str, object]:
        """A control body: a JSON object or a form."""
        text = self.body.decode(errors="replace").strip()
        if not text.startswith("{"):
            return parse_form(text)
        parsed = self.json()
        if not isinstance(parsed, dict):
            raise errors.v1_error(400, "The body must be a JSON object")
        return parsed


Handler = Callable[[State, Request, list[str]], dict[str, Any]]


@dataclass(frozen=True)
class Route:
    """``kind`` feeds the request counters: "stream", "session", "api" or "control"."""

    method: str
    pattern: re.Pattern[str]
    handler: Handler
    kind: str


_ACCOUNT = re.compile(r"^acct_[A-Za-z0-9]{1,64}$")


def stripe_account(request: Request, v2: bool) -> str:
    """The connected account a request acts for (the Stripe-Account header, or v2's
    Stripe-Context); "" = the platform."""
    names = ("stripe-account", "stripe-context")
    value = next((v for k, v in request.headers.items() if k.lower() in names), "")
    if value and not _ACCOUNT.match(value):
        message = f"No such account: '{value}'"
        raise errors.v2_error(400, message) if v2 else errors.v1_error(400, message)
    return value


def require_key(request: Request, v2: bool) -> None:
    """Secret and restricted keys pass; session tokens and anything else get a 401."""
    if not request.bearer().startswith(API_KEY_PREFIXES):
        raise errors.bad_key(v2)


def _v1(operation: Callable[[State, Request, list[str]], dict[str, Any]]) -> Handler:
    def handler(state: State, request: Request, groups: list[str]) -> dict[str, Any]:
        require_key(request, v2=False)
        return operation(state, request, groups)

    return handler


def _session(state: State, request: Request, groups: list[str]) -> dict[str, Any]:
    require_key(request, v2=True)
    return state.create_session()


def _stream(state: State, request: Request, groups: list[str]) -> dict[str, Any]:
    key = next((v for k, v in request.headers.items() if k.lower() == "idempotency-key"), "")
    return state.stream(request.bearer(), request.json(), key.strip())


def _v2_adjustment(state: State, request: Request, groups: list[str]) -> dict[str, Any]:
    require_key(request, v2=True)
    body = request.json()
    if not isinstance(body, dict):
        raise errors.v2_error(400, "The request body must be a JSON object")
    return state.cancel_event(body, v2=True)


def _events(state: State, request: Request, groups: list[str]) -> dict[str, Any]:
    require_key(request, v2=True)
    return state.error_reports(parse_form(request.query))


def _config(state: State, request: Request, groups: list[str]) -> dict[str, Any]:
    return dataclasses.asdict(state.configure(request.control()))


def _number(params: Mapping[str, object], key: str) -> float | None:
    raw = params.get(key)
    if raw is None:
        return None
    try:
        return float(str(raw))
    except ValueError:
        raise errors.v1_error(400, f"{key} must be a number", param=key) from None


def _clock(state: State, request: Request, groups: list[str]) -> dict[str, Any]:
    """``offset_seconds`` sets the offset; ``advance_seconds`` adds to it."""
    params = request.control()
    offset, advance = _number(params, "offset_seconds"), _number(params, "advance_seconds")
    if offset is None and advance is None:
        raise errors.v1_error(400, "Give offset_seconds or advance_seconds")
    base = state.clock_offset if offset is None else offset
    now = state.set_clock_offset(base + (advance or 0.0))
    return {"offset_seconds": state.clock_offset, "now": format_rfc3339(now), "now_epoch": now}


def _expire(state: State, request: Request, groups: list[str]) -> dict[str, Any]:
    return {"expired": state.expire_sessions()}


def _drop(state: State, request: Request, groups: list[str]) -> dict[str, Any]:
    rate = _number(request.control(), "rate")
    if rate is None:
        raise errors.v1_error(400, "rate is required", param="rate")
    return {"drop_rate": state.configure({"drop_rate": rate}).drop_rate}


_METER = r"/v1/billing/meters/([A-Za-z0-9_]+)"
_TABLE: list[tuple[str, str, Handler, str]] = [
    ("POST", "/v2/billing/meter_event_session", _session, "session"),
    ("POST", "/v2/billing/meter_event_stream", _stream, "stream"),
    ("POST", "/v2/billing/meter_event_adjustments", _v2_adjustment, "api"),
    ("GET", "/v2/core/events", _events, "api"),
    ("POST", "/v1/billing/meters", _v1(lambda s, r, g: s.create_meter(r.form())), "api"),
    ("GET", "/v1/billing/meters", _v1(lambda s, r, g: s.list_meters(r.form())), "api"),
    ("GET", _METER, _v1(lambda s, r, g: s.retrieve_meter(g[0])), "api"),
    ("POST", _METER, _v1(lambda s, r, g: s.update_meter(g[0], r.form())), "api"),
    ("POST", _METER + "/deactivate", _v1(lambda s, r, g: s.set_meter_active(g[0], False)), "api"),
    ("POST", _METER + "/reactivate", _v1(lambda s, r, g: s.set_meter_active(g[0], True)), "api"),
    (
        "GET",
        _METER + "/event_summaries",
        _v1(lambda s, r, g: s.event_summaries(g[0], r.form())),
        "api",
    ),
    (
        "POST",
        "/v1/billing/meter_event_adjustments",
        _v1(lambda s, r, g: s.cancel_event(r.form(), v2=False)),
        "api",
    ),
    ("GET", "/_emulator/state", lambda s, r, g: s.snapshot(), "control"),
    ("GET", "/_emulator/hourly", lambda s, r, g: s.hourly(), "control"),
    ("POST", "/_emulator/config", _config, "control"),
    ("POST", "/_emulator/clock", _clock, "control"),
    ("POST", "/_emulator/expire_sessions", _expire, "control"),
    ("POST", "/_emulator/drop", _drop, "control"),
]
ROUTES = [Route(m, re.compile(f"^{p}$"), h, k) for m, p, h, k in _TABLE]


def find_route(method: str, path: str) -> tuple[Route, list[str]]:
    """The route for ``method`` and ``path`` and its captured groups; otherwise a v1 404."""
    for route in ROUTES:
        match = route.pattern.match(path)
        if match and route.method == method:
            return route, list(match.groups())
    raise errors.v1_error(404, f"Unrecognized request URL ({method}: {path}).")
