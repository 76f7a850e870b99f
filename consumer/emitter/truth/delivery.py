"""Delivery truth without a network: when a push may be re-sent blindly, when it must be
checked against Stripe's event summaries instead, how that check decides, and what happens
to usage that reaches Stripe's 35-day timestamp limit.

Stripe remembers a meter event identifier for 24 hours. Within that time a re-send of a
push whose outcome is unknown is harmless (Stripe drops the copy); after it, a re-send of a
push that did land bills it twice. So a push is re-sent blindly only while its first
attempt is younger than `verify_after - settle` (20 h - 1 h by default); from
`verify_after` on, its minute is checked against the v1 event summary and it is marked
delivered or re-sent according to what Stripe counted. In between it waits, so the last
blind send has settled into the summary before anyone reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from consumer.config import StripeConfig
from consumer.emitter.plan.outbox import DELIVERED, Push
from consumer.emitter.plan.units import billed
from consumer.exact import EXACT

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
STRIPE_PAST_LIMIT_MS = 35 * DAY_MS  # Stripe refuses event timestamps older than this
MAX_UNKNOWN = 16  # unknown pushes in one minute that a check will try to tell apart
_RELATIVE = Decimal("1e-12")  # summaries are floats: closer than this is "equal"
_ABSOLUTE = Decimal("1e-9")  # one unit of Decimal(38, 9)


@dataclass(frozen=True)
class DeliveryPolicy:
    """The thresholds of StripeConfig, in milliseconds."""

    verify_after_ms: int = 20 * HOUR_MS
    settle_ms: int = HOUR_MS
    alert_age_ms: int = 30 * DAY_MS
    past_limit_policy: Literal["hold", "redate"] = "hold"
    margin_ms: int = HOUR_MS
    report_interval_ms: int = MINUTE_MS

    @classmethod
    def from_config(cls, c: StripeConfig) -> DeliveryPolicy:
        return cls(
            verify_after_ms=int(c.verify_after_hours * HOUR_MS),
            settle_ms=int(c.verify_settle_seconds * 1000),
            alert_age_ms=int(c.pending_age_alert_days * DAY_MS),
            past_limit_policy=c.past_limit_policy,
            margin_ms=int(c.past_limit_margin_seconds * 1000),
            report_interval_ms=int(c.error_report_interval_seconds * 1000),
        )

    def blind_after_ms(self, now_ms: int) -> int:
        """Pushes first attempted after this may still be re-sent without a check."""
        return now_ms - (self.verify_after_ms - self.settle_ms)

    def due_ms(self, now_ms: int) -> int:
        """Pushes first attempted at or before this are checked against event summaries."""
        return now_ms - self.verify_after_ms

    def limit_ms(self, now_ms: int) -> int:
        """The oldest timestamp sent to Stripe: its 35 days, less the margin for the time a
        request takes and for clock skew."""
        return now_ms - STRIPE_PAST_LIMIT_MS + self.margin_ms

    def redate_ms(self, now_ms: int) -> int:
        """Where the re-date policy moves a push: the first whole minute inside the limit,
        so the push stays in one minute of the event summaries."""
        limit = self.limit_ms(now_ms)
        return -(-limit // MINUTE_MS) * MINUTE_MS


@dataclass(frozen=True)
class Landed:
    """The check is exact: these unknown pushes are in Stripe's summary, the others not."""

    identifiers: frozenset[str]


@dataclass(frozen=True)
class Unclear:
    """The summary cannot tell which pushes landed; they are held, never re-sent."""

    reason: str


def _close(a: Decimal, b: Decimal, scale: Decimal) -> bool:
    return abs(EXACT.subtract(a, b)) <= max(abs(scale) * _RELATIVE, _ABSOLUTE)


def _weight(p: Push, formula: str) -> Decimal:
    return Decimal(1) if formula == "count" else billed(p)


def judge(
    summary: Decimal, rows: Sequence[Push], formula: str, time_window: str | None = None
) -> Landed | Unclear:
    """Which of a minute's unknown pushes Stripe counted, from its summary of that minute.

    `rows` is every push of one (Stripe event name, customer, minute). Pushes marked
    delivered are known to be in the summary; pushes never attempted, rejected or expired
    are known not to be; attempted pushes without a mark are unknown. For an additive meter
    (sum, or count of events, without an event time window) the summary equals the known
    pushes plus the unknown ones that landed, so the answer is the subset of unknown pushes
    whose weights make up the difference. It is taken only when exactly one subset fits.

    Ambiguity is held, never guessed: two unknown pushes of equal weight where only one
    landed, a difference no subset explains (another writer of the meter, an event lost
    after its 2xx, a rejection not yet reported), a non-additive meter with more than one
    push in the minute, or more than MAX_UNKNOWN unknown pushes. A held push is neither
    re-sent nor marked; it stays pending, is counted in `stripe_pushes_held{status=
    "unverifiable"}` and logged, and is checked again later. Zero-weight pushes change no
    bill whether re-sent or not, so they are left out of the subset and re-sent.

    The check assumes the outbox is the only writer of these meters, as Stripe cannot say
    which identifiers a summary holds.
    """
    known = [p for p in rows if p.status in DELIVERED]
    unknown = [p for p in rows if p.attempted]
    additive = formula in ("sum", "count") and time_window is None
    if not additive:
        lone = len(unknown) == 1 and not known and billed(unknown[0]) != 0
        if not lone:
            return Unclear(f"a {formula} meter sums nothing: one unknown push per minute only")
    weighted = [(p.identifier, _weight(p, formula)) for p in unknown]
    weighted = [(i, w) for i, w in weighted if w != 0]
    if len(weighted) > MAX_UNKNOWN:
        return Unclear(f"{len(weighted)} unknown pushes in one minute (at most {MAX_UNKNOWN})")
    target = summary
    for p in known:
        target = EXACT.subtract(target, _weight(p, formula))
    subsets: list[tuple[Decimal, frozenset[str]]] = [(Decimal(0), frozenset())]
    for identifier, w in weighted:
        subsets += [(EXACT.add(s, w), ids | {identifier}) for s, ids in subsets]
    fits = [ids for s, ids in subsets if _close(s, target, summary)]
    if not fits:
        return Unclear(f"no combination of unknown pushes makes the summary ({summary})")
    if len(fits) > 1:
        return Unclear(f"{len(fits)} combinations of unknown pushes make the summary")
    return Landed(fits[0])
