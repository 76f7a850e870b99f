"""The dlq commands' pieces that need no service: times, coordinates, links, dumps."""

from __future__ import annotations

import pytest

from consumer.ops.dlq.select import DlqError, Filters, parse_when, parse_which
from consumer.ops.dlq.show import _which, hexdump

NOW = 1_800_000_000.0


def test_times_are_ages_epoch_seconds_or_rfc3339_with_a_zone() -> None:
    assert parse_when("90m", NOW) == int((NOW - 5400) * 1000)
    assert parse_when("7d", NOW) == int((NOW - 7 * 86400) * 1000)
    assert parse_when("1700000000", NOW) == 1_700_000_000_000
    assert parse_when("2023-11-14T22:13:20Z", NOW) == 1_700_000_000_000
    for bad in ("yesterday", "2023-11-14T22:13:20", "7 days"):
        with pytest.raises(DlqError):
            parse_when(bad, NOW)
    with pytest.raises(DlqError, match="--until must be after --since"):
        Filters("t", since_ms=2, until_ms=1)


def test_a_dead_letter_is_named_as_list_prints_it() -> None:
    assert parse_which("3:1200", "usage.events") == ("usage.events", 3, 1200)
    assert parse_which("other.events:0:7", "usage.events") == ("other.events", 0, 7)
    for bad in ("3", "a:b", "3:1200:x:y"):
        with pytest.raises(DlqError):
            parse_which(bad, "usage.events")
    assert _which("usage.events/1/109", "usage.events") == "1:109"
    assert _which("other.events/1/109", "usage.events") == "other.events:1:109"


def test_the_hex_dump_stops_at_its_limit() -> None:
    lines = hexdump(bytes(range(256)) * 40, limit=64)
    assert len(lines) == 5 and lines[-1] == "  ... 10176 more bytes"
    assert lines[0].startswith("  00000000  00 01 02")
