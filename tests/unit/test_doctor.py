"""`doctor`'s judgements without services: the clock-skew thresholds, the exit code, the
runner's deadline and its masking of secrets, and what the registry check can read."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from consumer.clock import ManualClock
from consumer.config import load_settings
from consumer.decode.schemas import SCHEMAS_DIR, load_schema
from consumer.ops.doctor.kafka_checks import judge_skew
from consumer.ops.doctor.registry_check import unreadable
from consumer.ops.doctor.report import Finding, Status, ok, span, warn
from consumer.ops.doctor.runner import Check, Env, exit_code, run_checks
from consumer.ops.doctor.stripe_checks import request_rate

SECRET = "sk_test_doctor_secret_123"


def _settings() -> Any:
    return load_settings(stripe={"api_key": SECRET})


@pytest.mark.parametrize(
    ("broker", "status"),
    [
        (100.5, Status.OK),  # appended within the round trip [100, 101]
        (99.0, Status.OK),  # a second behind
        (107.0, Status.WARN),  # 6 s ahead
        (100 - 119.0, Status.WARN),
        (100 - 120.0, Status.FAIL),  # stripe.session_refresh_margin_seconds (120)
        (101 + 600.0, Status.FAIL),
    ],
)
def test_clock_skew_thresholds(broker: float, status: Status) -> None:
    found = judge_skew(broker, 100.0, 101.0, _settings())
    assert found.status is status, found
    if status is not Status.OK:
        assert "NTP" in found.fix


def test_skew_says_which_side_and_how_far() -> None:
    found = judge_skew(100.0 - 130, 100.0, 101.0, _settings())
    assert found.detail.startswith("broker 2m10s behind this host")


def test_exit_code_is_the_worst_status_from_the_threshold_on() -> None:
    rows = [ok("a", ""), warn("b", "", "fix")]
    assert exit_code(rows) == 1
    assert exit_code(rows, Status.FAIL) == 0
    assert exit_code([ok("a", "")]) == 0
    assert exit_code([*rows, Finding("c", Status.FAIL, "", "fix")], Status.FAIL) == 2


def test_a_hung_or_raising_check_is_a_fail_and_the_others_still_report() -> None:
    settings = _settings()
    release = threading.Event()

    def hangs(env: Env) -> list[Finding]:
        release.wait()
        return [ok("hangs", "never seen")]

    def raises(env: Env) -> list[Finding]:
        raise RuntimeError(f"refused key {SECRET}")

    def fine(env: Env) -> list[Finding]:
        return [ok("fine", "all good")]

    checks = [
        Check("hangs", hangs, "wake it"),
        Check("raises", raises, "mend it"),
        Check("fine", fine, "-"),
    ]
    try:
        found = run_checks(checks, Env(settings, ManualClock(), timeout=0.2))
    finally:
        release.set()
    assert [(f.check, f.status) for f in found] == [
        ("hangs", Status.FAIL),
        ("raises", Status.FAIL),
        ("fine", Status.OK),
    ]
    assert found[0].detail == "no answer within 0.2 s" and found[0].fix == "wake it"
    assert found[1].detail == "RuntimeError: refused key [redacted]"
    assert found[1].fix == "mend it"


@pytest.mark.parametrize(
    ("key", "rate", "base", "status"),
    [
        ("sk_test_x", 20.0, "https://api.stripe.com", Status.OK),
        ("sk_test_x", 30.0, "https://api.stripe.com", Status.FAIL),  # sandbox: 25/s
        ("rk_live_x", 100.0, "https://api.stripe.com", Status.OK),
        ("sk_live_x", 150.0, "https://api.stripe.com", Status.WARN),  # v1 calls: 100/s
        ("sk_live_x", 20_000.0, "https://api.stripe.com", Status.FAIL),  # the stream: 10,000/s
        ("pk_x", 20.0, "https://api.stripe.com", Status.WARN),  # mode unknown
        ("sk_test_x", 500.0, "http://127.0.0.1:12111", Status.OK),  # the emulator
    ],
)
def test_request_rate_against_the_keys_mode(
    key: str, rate: float, base: str, status: Status
) -> None:
    settings = load_settings(
        stripe={
            "api_key": key,
            "requests_per_second": rate,
            "api_base": base,
            "meter_events_base": base,
        }
    )
    (found,) = request_rate(Env(settings, ManualClock(), 1.0))
    assert found.status is status, found
    assert key not in found.detail + found.fix


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_every_packaged_writer_schema_is_readable(version: int) -> None:
    assert unreadable(load_schema(SCHEMAS_DIR / f"usage_event.v{version}.avsc")) is None


def _v4_with(change: Any) -> Any:
    schema = load_schema(SCHEMAS_DIR / "usage_event.v4.avsc")
    fields = {f["name"]: f for f in schema["fields"]}
    change(fields, schema)
    return schema


def test_unreadable_writer_schemas_say_why() -> None:
    def drop_customer(fields: Any, schema: Any) -> None:
        schema["fields"] = [f for f in schema["fields"] if f["name"] != "customer_id"]

    assert "customer_id" in str(unreadable(_v4_with(drop_customer)))

    def id_as_int(fields: Any, schema: Any) -> None:
        fields["event_id"]["type"] = "int"  # read only when a message is: the trial finds it

    assert unreadable(_v4_with(id_as_int)) is not None

    def optional_name(fields: Any, schema: Any) -> None:
        fields["event_name"]["type"] = ["string", "null"]  # its null the reader cannot take

    assert unreadable(_v4_with(optional_name)) is not None


def test_span() -> None:
    assert [span(s) for s in (0.5, 59, 61.85, 3600, 3723, 7 * 86400)] == [
        "0.5s",
        "59s",
        "1m1s",
        "1h",
        "1h2m",
        "168h",
    ]
