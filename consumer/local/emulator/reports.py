"""The asynchronous error-report feed, a stand-in for thin events sent to event destinations.

``GET /v2/core/events`` answers ``{"data": [event, ...], "next_page_url": null}``, newest first,
where each event (one per stream request that had asynchronous failures) looks like::

    {"id": "evt_test_...", "object": "v2.core.event",
     "type": "v1.billing.meter.error_report_triggered",
     "created": "2024-06-01T12:00:00.000Z", "livemode": false,
     "data": {"developer_message_summary": "2 invalid meter events",
              "validation_start": "<RFC 3339>", "validation_end": "<RFC 3339>",
              "reason": {"error_count": 2,
                         "error_types": [{"code": "no_meter", "error_count": 1,
                                          "sample_errors": [{"error_message": "...",
                                                             "request": {"identifier": "..."}}]}]}}}

Filters: ``type`` or ``types[N]`` (only the one type above exists here) and ``created_gt``,
``created[gt]``, ``created[gte]``, ``created[lt]``, ``created[lte]`` (RFC 3339). Unlike Stripe,
every failing event is listed in ``sample_errors`` (a request holds at most 100).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from consumer.local.emulator.errors import v2_error
from consumer.local.emulator.events import Problem
from consumer.local.emulator.formats import format_rfc3339, parse_rfc3339

REPORT_TYPE = "v1.billing.meter.error_report_triggered"
_COMPARE: dict[str, Callable[[int, int], bool]] = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


@dataclass(frozen=True)
class ErrorReport:
    """The failures of one stream request; ``created_ms`` is what the RFC 3339 string shows."""

    id: str
    created_ms: int
    failures: tuple[tuple[str, Problem], ...]

    def to_json(self) -> dict[str, Any]:
        """The ``v2.core.event`` object."""
        created = format_rfc3339(self.created_ms / 1000)
        by_code: dict[str, list[dict[str, Any]]] = {}
        for identifier, problem in self.failures:
            sample = {"error_message": problem.message, "request": {"identifier": identifier}}
            by_code.setdefault(problem.code, []).append(sample)
        error_types = [
            {"code": code, "error_count": len(samples), "sample_errors": samples}
            for code, samples in by_code.items()
        ]
        count = len(self.failures)
        data = {
            "developer_message_summary": f"{count} invalid meter event(s)",
            "validation_start": created,
            "validation_end": created,
            "reason": {"error_count": count, "error_types": error_types},
        }
        return {
            "id": self.id,
            "object": "v2.core.event",
            "type": REPORT_TYPE,
            "created": created,
            "livemode": False,
            "data": data,
        }


def new_report(failures: list[tuple[str, Problem]], now: float) -> ErrorReport:
    """One report for one request's failures."""
    return ErrorReport(f"evt_test_{secrets.token_hex(12)}", math.floor(now * 1000), tuple(failures))


def _types(params: Mapping[str, object]) -> set[str] | None:
    wanted: set[str] = set()
    single = params.get("type")
    if isinstance(single, str):
        wanted.add(single)
    many = params.get("types")
    if isinstance(many, dict):
        wanted.update(str(v) for v in many.values())
    elif isinstance(many, str):
        wanted.add(many)
    return wanted or None


def _bounds(params: Mapping[str, object]) -> list[tuple[str, int]]:
    raw: list[tuple[str, object]] = []
    if "created_gt" in params:
        raw.append(("gt", params["created_gt"]))
    created = params.get("created")
    if isinstance(created, dict):
        raw.extend((op, value) for op, value in created.items())
    bounds = []
    for op, value in raw:
        if op not in _COMPARE or not isinstance(value, str):
            raise v2_error(400, f"Invalid created filter: {op}")
        try:
            bounds.append((op, math.floor(parse_rfc3339(value) * 1000)))
        except ValueError as exc:
            raise v2_error(400, str(exc)) from None
    return bounds


def list_reports(reports: list[ErrorReport], params: Mapping[str, object]) -> dict[str, Any]:
    """Filter and render the feed, newest first."""
    types, bounds = _types(params), _bounds(params)
    if types is not None and REPORT_TYPE not in types:
        return {"data": [], "next_page_url": None}
    kept = [
        report
        for report in reversed(reports)
        if all(_COMPARE[op](report.created_ms, limit) for op, limit in bounds)
    ]
    return {"data": [report.to_json() for report in kept], "next_page_url": None}
