"""Log lines: JSON when configured, secrets masked in messages and tracebacks, and Stripe's
trouble written as one counted WARN line a period."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from consumer.clock import ManualClock
from consumer.config import load_settings
from consumer.emitter.send.trouble import Trouble
from consumer.ops import logs

KEY = "sk_live_0123456789abcdef"
PASSWORD = "hunter2-clickhouse"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A root handler writing to a buffer, as basicConfig makes one, removed afterwards."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.addHandler(handler)
    log = logging.getLogger("consumer.test")
    log.setLevel(logging.INFO)
    try:
        yield log, out
    finally:
        root.removeHandler(handler)


def configure(fmt: str) -> None:
    logs.configure(
        load_settings(
            stripe={"api_key": KEY},
            clickhouse={"password": PASSWORD},
            log={"format": fmt},
        )
    )


def test_json_lines_carry_the_record_and_never_a_secret(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = captured
    configure("json")
    log.warning("connecting with %s to %s", KEY, "api.stripe.com")
    try:
        raise RuntimeError(f"auth failed for password {PASSWORD}")
    except RuntimeError:
        log.exception("store refused")
    lines = out.getvalue().splitlines()
    docs = [json.loads(line) for line in lines]
    assert [d["level"] for d in docs] == ["WARNING", "ERROR"]
    assert docs[0]["logger"] == "consumer.test"
    assert docs[0]["message"] == f"connecting with {logs.MASK} to api.stripe.com"
    assert "RuntimeError: auth failed for password [redacted]" in docs[1]["exception"]
    assert docs[0]["time"].endswith("+00:00")
    assert KEY not in out.getvalue() and PASSWORD not in out.getvalue()


def test_text_lines_are_masked_too(captured: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = captured
    configure("text")
    log.info("key=%s", KEY)
    line = out.getvalue().strip()
    assert line.endswith(f"INFO consumer.test: key={logs.MASK}")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_the_json_setting_is_checked() -> None:
    from consumer.config import ConfigError

    with pytest.raises(ConfigError, match=r"log\.format"):
        load_settings(log={"format": "yaml"})


def test_stripe_trouble_is_one_counted_line_a_period(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    trouble = Trouble(clock, every_seconds=30)
    caplog.set_level(logging.WARNING, logger="consumer.emitter.send.trouble")
    for status in ["429"] * 5 + ["500", "session_expired", "429"]:
        trouble.note(status)
    trouble.report()
    assert caplog.records == []  # within the period: nothing yet
    clock.sleep(31)
    trouble.report()
    trouble.report()  # counted once
    assert [r.getMessage() for r in caplog.records] == [
        "Stripe: 8 requests retried in the last 31 s (429: 6, 500: 1, session_expired: 1)"
    ]
    clock.sleep(31)
    trouble.report()  # a quiet period writes nothing
    assert len(caplog.records) == 1
