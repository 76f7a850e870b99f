"""Stripe's asynchronous error reports: a 2xx only says a request was received.

Stripe validates stream events after answering and reports the failures as
`v1.billing.meter.error_report_triggered` events (STRIPE_FACTS §3), listed by
`GET /v2/core/events`. Each report names failing identifiers in `sample_errors`; Stripe
sends samples only, so `error_count` may exceed what a report names, and the difference is
counted as unidentified for a person (and reconciliation) to chase.

The reader keeps a cursor on `created`. It advances only after the caller has recorded a
batch, so a failed write reads the same reports again; reports at the cursor's millisecond
are remembered by id, so none is taken twice or skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import stripe

from consumer.emitter.sender import rfc3339

REPORT_TYPE = "v1.billing.meter.error_report_triggered"


@dataclass(frozen=True)
class Rejection:
    identifier: str
    code: str
    message: str


@dataclass
class ReportBatch:
    rejections: list[Rejection] = field(default_factory=list)
    unidentified: int = 0
    reports: int = 0
    cursor_ms: int = 0
    at_cursor: set[str] = field(default_factory=set)


def parse_ms(text: str) -> int:
    moment = datetime.fromisoformat(text.replace("z", "Z"))
    return int(moment.timestamp()) * 1000 + moment.microsecond // 1000


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def parse_report(event: Mapping[str, Any]) -> tuple[list[Rejection], int]:
    """The named rejections of one report, and how many more it counted without naming."""
    reason = _dict(_dict(event.get("data")).get("reason"))
    named: list[Rejection] = []
    for kind in reason.get("error_types") or []:
        code = str(_dict(kind).get("code") or "unknown")
        for sample in _dict(kind).get("sample_errors") or []:
            identifier = _dict(_dict(sample).get("request")).get("identifier")
            if identifier:
                message = str(_dict(sample).get("error_message") or "")
                named.append(Rejection(str(identifier), code, message))
    counted = int(reason.get("error_count") or 0)
    return named, max(0, counted - len(named))


class ErrorReportReader:
    def __init__(self, api: stripe.StripeClient, start_ms: int) -> None:
        self._api = api
        self._cursor_ms = start_ms
        self._at_cursor: set[str] = set()

    def fetch(self) -> ReportBatch:
        """Reports created at or after the cursor that were not taken yet."""
        params: Any = {"types": [REPORT_TYPE], "created": {"gte": rfc3339(self._cursor_ms)}}
        batch = ReportBatch(cursor_ms=self._cursor_ms, at_cursor=set(self._at_cursor))
        for item in self._api.v2.core.events.list(params).auto_paging_iter():
            event = item.to_dict()
            report_id = str(event.get("id"))
            if event.get("type") != REPORT_TYPE or report_id in self._at_cursor:
                continue
            created = parse_ms(str(event.get("created")))
            named, unnamed = parse_report(event)
            batch.rejections += named
            batch.unidentified += unnamed
            batch.reports += 1
            if created > batch.cursor_ms:
                batch.cursor_ms, batch.at_cursor = created, set()
            if created == batch.cursor_ms:
                batch.at_cursor.add(report_id)
        return batch

    def advance(self, batch: ReportBatch) -> None:
        """The batch is recorded: never read it again."""
        self._cursor_ms, self._at_cursor = batch.cursor_ms, batch.at_cursor
