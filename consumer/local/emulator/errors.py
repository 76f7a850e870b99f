"""Error answers in the two shapes Stripe uses, raised from state code and rendered by the server.

The SDK picks its exception class from the v2 ``error.type`` (v2 paths) or from the HTTP status
(v1 paths), so each helper fixes both the status and the body to match what the SDK expects.
"""

from __future__ import annotations

from typing import Any

EXPIRED_DOC_URL = "https://docs.stripe.com/error-codes#billing-meter-event-session-expired"


class EmulatorError(Exception):
    """An HTTP error answer: status, JSON body and extra headers."""

    def __init__(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(str(body.get("error", {}).get("message", "")))
        self.status = status
        self.body = body
        self.headers = headers or {}

    @property
    def code(self) -> str | None:
        """The error ``code``, handy in tests."""
        code = self.body.get("error", {}).get("code")
        return code if isinstance(code, str) else None


def v1_error(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> EmulatorError:
    """A v1 error: ``{"error": {"type": "invalid_request_error", "message", "param"}}``."""
    inner: dict[str, Any] = {"type": "invalid_request_error", "message": message}
    if param is not None:
        inner["param"] = param
    if code is not None:
        inner["code"] = code
    return EmulatorError(status, {"error": inner})


def v2_error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str = "invalid_request",
    headers: dict[str, str] | None = None,
) -> EmulatorError:
    """A generic v2 error: ``{"error": {"type", "code", "message"}}``."""
    return EmulatorError(
        status, {"error": {"type": type_, "code": code, "message": message}}, headers
    )


def session_expired() -> EmulatorError:
    """The one documented stream error (STRIPE_FACTS §2); the SDK maps it by ``type``."""
    inner = {
        "type": "temporary_session_expired",
        "code": "billing_meter_event_session_expired",
        "message": "The temporary session token has expired",
        "doc_url": EXPIRED_DOC_URL,
    }
    return EmulatorError(401, {"error": inner})


def bad_key(v2: bool) -> EmulatorError:
    """401 for a missing or unknown credential; the SDK raises AuthenticationError."""
    message = "Invalid API Key provided"
    if v2:
        return v2_error(401, message, code="invalid_api_key")
    return v1_error(401, message)


def rate_limited() -> EmulatorError:
    """429 that tells the SDK (and our emitter) that retrying is safe."""
    return v2_error(
        429,
        "Too many requests hit the API too quickly.",
        type_="rate_limit",
        code="rate_limit",
        headers={"Stripe-Should-Retry": "true"},
    )


def server_error() -> EmulatorError:
    """A 500 injected by the chaos knob; nothing of the request was stored."""
    return v2_error(500, "An unexpected error occurred.", type_="api_error", code="api_error")


def duplicates(identifiers: list[str], names: str = "all") -> EmulatorError:
    """400 for repeated identifiers, with ``Stripe-Should-Retry: false`` as seen in the field.

    ``names`` is how many the message names: ``first`` words it as the one answer seen
    from Stripe ("An event already exists with identifier <id>."), ``all`` lists every one,
    ``none`` names none."""
    if names == "first":
        message = f"An event already exists with identifier {identifiers[0]}."
    elif names == "all":
        message = f"Events already exist with identifiers {', '.join(identifiers)}."
    else:
        message = "An event in this request has an identifier that already exists."
    return v2_error(
        400,
        message,
        code="duplicate_meter_event",
        headers={"Stripe-Should-Retry": "false"},
    )


def idempotency_mismatch(key: str) -> EmulatorError:
    """400 for an Idempotency-Key reused with other parameters (the SDK raises
    IdempotencyError for this ``type``)."""
    message = (
        f"Keys for idempotent requests can only be used with the same parameters they were "
        f"first used with. Try using a key other than '{key}' if you meant to execute a "
        "different request."
    )
    return v2_error(400, message, type_="idempotency_error", code="idempotency_key_in_use")
