"""Stripe's asynchronous error reports: a 2xx only says a request was received.

Stripe validates stream events after answering and reports the failures as
`v1.billing.meter.error_report_triggered` events (STRIPE_FACTS §3), listed by
`GET /v2/core/events`. Each report names failing identifiers in `sample_errors`; Stripe
sends samples only, so `error_count` may exceed what a report names, and the difference is
counted as unidentified for a person (and reconciliation) to chase.

The reader keeps a cursor on `created`. It advances only after the caller has recorded a
batch, so a failed write reads the same reports again; reports at the cursor's millisecond
are remembered by id, so none is taken twice or skipped.

The taker marks the pushes a report names as rejected, with the reason: a 2xx is not
billing, and usage Stripe refused must show as not billed rather than as sent.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import stripe

from consumer.config import StripeConfig
from consumer.emitter.plan import outbox
from consumer.emitter.plan.outbox import REJECTED, Push
from consumer.emitter.send.sender import rfc3339
from consumer.emitter.truth.delivery import DAY_MS, DeliveryPolicy
from consumer.metrics import Metrics
from consumer.store import tenants
from consumer.store.backend import Backend

# The emitter's messages keep one logger name: log settings and alerts select on it.
log = logging.getLogger("consumer.emitter.loop")
REPORT_TYPE = "v1.billing.meter.error_report_triggered"
REPORT_LOOKBACK_MS = 30 * DAY_MS  # Stripe lists events for 30 days
_PART = re.compile(r"^(uc1[ae]_[0-9a-f]+)-p\d+$")


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


def push_identifier(identifier: str) -> str:
    """The push a meter event belongs to: a value split into parts sends `<id>-p<n>`."""
    match = _PART.match(identifier)
    return match.group(1) if match else identifier


class ErrorReportReader:
    """One account's report feed ("" = the platform's; a connected account has its own)."""

    def __init__(self, api: stripe.StripeClient, start_ms: int, account: str = "") -> None:
        self._api = api
        self._cursor_ms = start_ms
        self._at_cursor: set[str] = set()
        self._options: Any = {"stripe_account": account} if account else None

    def fetch(self) -> ReportBatch:
        """Reports created at or after the cursor that were not taken yet."""
        params: Any = {"types": [REPORT_TYPE], "created": {"gte": rfc3339(self._cursor_ms)}}
        batch = ReportBatch(cursor_ms=self._cursor_ms, at_cursor=set(self._at_cursor))
        listing = (
            self._api.v2.core.events.list(params, self._options)
            if self._options
            else self._api.v2.core.events.list(params)
        )
        for item in listing.auto_paging_iter():
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


class ReportTaker:
    """Reads the reports at most once per `report_interval` and records what they name."""

    def __init__(
        self,
        store: Backend,
        api: stripe.StripeClient,
        policy: DeliveryPolicy,
        metrics: Metrics,
        now_ms: int,
        config: StripeConfig,
    ) -> None:
        self._store = store
        self._policy = policy
        self._metrics = metrics
        self._api = api
        self._start_ms = now_ms - REPORT_LOOKBACK_MS
        self._readers = {"": ErrorReportReader(api, self._start_ms)}
        self._next_ms = 0
        self._property, self._accounts = config.account_property, dict(config.accounts)

    def take(self, now_ms: int) -> int:
        """Mark the pushes Stripe's error reports name as rejected, with the reason."""
        if now_ms < self._next_ms:
            return 0
        self._next_ms = now_ms + self._policy.report_interval_ms
        for account in tenants.accounts(self._store, self._property, self._accounts):
            if account not in self._readers:
                self._readers[account] = ErrorReportReader(self._api, self._start_ms, account)
        return sum(self._take(reader, now_ms) for reader in self._readers.values())

    def _take(self, reader: ErrorReportReader, now_ms: int) -> int:
        try:
            batch = reader.fetch()
        except (stripe.StripeError, ValueError) as exc:
            log.warning("cannot read Stripe error reports, retrying later: %s", exc)
            return 0
        if batch.unidentified:
            self._metrics.stripe_rejections_unidentified.inc(batch.unidentified)
            log.error(
                "Stripe reported %d rejected meter events without naming them: "
                "reconcile against event summaries",
                batch.unidentified,
            )
        why = {push_identifier(r.identifier): f"{r.code}: {r.message}" for r in batch.rejections}
        code = {push_identifier(r.identifier): r.code for r in batch.rejections}
        ids = sorted(why)
        rows: list[Push] = []
        for i in range(0, len(ids), 1000):
            rows += outbox.by_identifier(self._store, ids[i : i + 1000])
        rejected = [
            p.moved(REJECTED, reason=why[p.identifier]) for p in rows if p.status != REJECTED
        ]
        outbox.write(self._store, rejected, REJECTED, now_ms)
        reader.advance(batch)
        for p in rejected:
            self._metrics.stripe_rejected.labels(code[p.identifier]).inc()
        if rejected:
            value = sum((p.value for p in rejected), Decimal(0))
            log.error(
                "Stripe rejected %d meter events after a 2xx (value %s, codes %s): marked "
                "rejected, NOT billed; see the stripe_delivery view. First: %s",
                len(rejected),
                value,
                ", ".join(sorted({code[p.identifier] for p in rejected})),
                "; ".join(f"{p.identifier} ({p.reason})" for p in rejected[:5]),
            )
        return len(rejected)
