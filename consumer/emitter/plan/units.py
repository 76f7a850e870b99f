"""What a push sends: exact usage turned into the values Stripe accepts, fixed before the
first send.

Stripe's meter values are whole numbers sent as strings, of at most 15 significant digits.
Usage is kept exact (Decimal(38, 9)), so in `whole` format a push of a sum meter sends
floor(everything assigned so far for its meter and customer, plus this push) minus what was
already sent for them: fractions carry to the next push instead of being rounded away, and
what Stripe holds for a customer never exceeds the exact usage, nor trails it by a unit or
more once the outbox is drained. In `decimal` format the exact value is sent. Either way a
value with more than 15 significant digits is split into several events (`parts`).

The amount is assigned once, in the same insert that records the push's first attempt, so a
re-send after a crash sends exactly what the first send did. Pushes Stripe did not bill
(rejected) and cancelled ones are left out of the carry, as if they never happened.
A push that cannot be sent as it is (a fractional `last` value in whole format, or a value
needing more than one request of parts) is rejected here with its reason, never rounded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal

from consumer.config import MeterConfig
from consumer.emitter.plan.accounts import AccountResolver, Unbillable
from consumer.emitter.plan.outbox import CANCELLED, REJECTED, SENT, Push
from consumer.exact import EXACT, exact
from consumer.store.backend import Backend

log = logging.getLogger("consumer.emitter.loop")  # the emitter's alerts share one logger
MAX_DIGITS = 15
MAX_WHOLE = 10**MAX_DIGITS - 1
MAX_PARTS = 100  # one request


@dataclass(frozen=True)
class Rule:
    """How one meter's usage becomes Stripe values."""

    format: str  # "whole" or "decimal"
    carries: bool  # a sum: fractions carry between pushes
    one: bool = False  # a Stripe count meter counts events: each push sends 1


_EXACT_RULE = Rule("decimal", False)  # a meter without a rule sends its exact value


def rules_for(meters: Sequence[MeterConfig]) -> dict[str, Rule]:
    return {
        m.name: Rule(m.stripe_value_format, m.formula == "sum", m.formula == "count")
        for m in meters
        if m.stripe_event_name
    }


def significant_digits(value: Decimal) -> int:
    """The digits of exact(value) without sign, point and leading zeros (at least 1)."""
    _, digits, exponent = value.normalize(EXACT).as_tuple()
    return len(digits) + max(int(exponent), 0)  # a whole number's trailing zeros count


def parts(amount: Decimal, fmt: str) -> list[str]:
    """The value strings that together send `amount`, each of at most 15 significant
    digits; empty for zero (nothing to send)."""
    if amount == 0:
        return []
    if fmt == "decimal" and significant_digits(amount) <= MAX_DIGITS:
        return [exact(amount)]
    whole = int(amount.to_integral_value(ROUND_FLOOR))
    out = [str(MAX_WHOLE)] * (whole // MAX_WHOLE)
    if whole % MAX_WHOLE:
        out.append(str(whole % MAX_WHOLE))
    fraction = EXACT.subtract(amount, Decimal(whole))
    if fraction:  # at most 9 places: one more part
        out.append(exact(fraction))
    return out


def part_count(amount: Decimal, fmt: str) -> int:
    """len(parts(amount, fmt)), without building them (a huge value needs thousands)."""
    if amount == 0:
        return 0
    if fmt == "decimal" and significant_digits(amount) <= MAX_DIGITS:
        return 1
    whole = int(amount.to_integral_value(ROUND_FLOOR))
    return int(-(-whole // MAX_WHOLE)) + (0 if amount == whole else 1)


def floor(value: Decimal) -> Decimal:
    return value.to_integral_value(ROUND_FLOOR)


def _carried(store: Backend, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Decimal]:
    """(meter, customer) -> exact usage assigned so far minus what was sent for it. Read
    through the outbox's by_bucket projection (migration 23 gave it the amounts): the
    customers' pushes by key, every version of each, keeping its highest rank as FINAL
    would (versions of one rank carry the same amounts: they are fixed once)."""
    if not keys:
        return {}
    rows = store.query(
        """SELECT m, c, toString(sum(v)), toString(sum(ifNull(sent, v)))
           FROM (SELECT identifier, any(meter) AS m, any(customer_id) AS c,
                        argMax(value, status_rank) AS v,
                        argMax(sent_value, status_rank) AS sent,
                        argMax(first_attempt_at, status_rank) AS first_attempt,
                        max(status_rank) AS rank
                 FROM stripe_pushes
                 WHERE meter IN {meters:Array(String)}
                   AND customer_id IN {customers:Array(String)}
                   AND (meter, customer_id) IN {keys:Array(Tuple(String, String))}
                 GROUP BY identifier)
           WHERE toUnixTimestamp64Milli(first_attempt) > 0 AND rank NOT IN {gone:Array(UInt8)}
           GROUP BY m, c""",
        {
            "meters": sorted({m for m, _ in keys}),
            "customers": sorted({c for _, c in keys}),
            "keys": list(keys),
            "gone": [REJECTED, CANCELLED],
        },
    )
    return {(str(m), str(c)): EXACT.subtract(Decimal(s), Decimal(u)) for m, c, s, u in rows}


class Assigner:
    """Fixes what each never-sent push will send, carrying fractions per meter and customer."""

    def __init__(
        self, store: Backend, rules: Mapping[str, Rule], accounts: AccountResolver | None = None
    ) -> None:
        self._store = store
        self._rules = rules
        self._accounts = accounts
        self._carry: dict[tuple[str, str], Decimal] = {}

    def forget(self) -> None:
        """Drop the carries read so far. A carry is read once and then kept by assign(),
        which the caller follows by writing what it assigned; the emitter calls this when
        anything else may have moved one: a rejection or a cancellation of an assigned push
        (error reports and corrections), a cycle that failed after assigning (its writes
        may not have landed), a lease taken anew (another process emitted meanwhile).
        Reading the carries every cycle read each customer's pushes ever assigned."""
        self._carry = {}

    def assign(self, pushes: Sequence[Push], status: int, first_attempt_ms: int) -> list[Push]:
        """`pushes` moved to `status` with a first attempt now (see `settle`). The caller
        writes them all in one insert: a push's carry depends on every push assigned before
        it."""
        pushes, unplaced = self._place(pushes, first_attempt_ms)
        fresh = [
            p
            for p in pushes
            if p.first_attempt_ms == 0 and p.sent is None and self._carries(p.meter)
        ]
        unread = sorted({(p.meter, p.customer_id) for p in fresh} - self._carry.keys())
        self._carry.update(dict.fromkeys(unread, Decimal(0)) | _carried(self._store, unread))
        out = settle(pushes, self._rules, self._carry, status, first_attempt_ms)
        out += unplaced
        refused = [p for p in out if p.status == REJECTED]
        if refused:
            log.error(
                "%d Stripe pushes cannot be sent as they are and were NOT billed (held as "
                "rejected; see the stripe_delivery view). First: %s (%s)",
                len(refused),
                refused[0].identifier,
                refused[0].reason,
            )
        return out

    def _place(self, pushes: Sequence[Push], at: int) -> tuple[list[Push], list[Push]]:
        """Never-attempted pushes with their connected account set, and those refused
        because their customer has no single account."""
        fresh = [p for p in pushes if p.first_attempt_ms == 0 and p.sent is None]
        if self._accounts is None or not fresh:
            return list(pushes), []
        where = self._accounts.resolve(fresh)
        placed, refused = [], []
        for p in pushes:
            account = where.get((p.meter, p.customer_id), p.account)
            if p.first_attempt_ms or p.sent is not None:
                placed.append(p)
            elif isinstance(account, Unbillable):
                refused.append(
                    p.moved(REJECTED, first_attempt_ms=at, sent=Decimal(0), reason=account.reason)
                )
            elif account == p.account:
                placed.append(p)
            else:
                placed.append(p.moved(p.status, account=account))
        return placed, refused

    def _carries(self, meter: str) -> bool:
        rule = self._rules.get(meter)
        return rule is not None and rule.format == "whole" and rule.carries


def settle(
    pushes: Sequence[Push],
    rules: Mapping[str, Rule],
    carry: dict[tuple[str, str], Decimal],
    status: int,
    at: int,
) -> list[Push]:
    """`pushes` moved to `status`, first attempted `at`. The never-attempted ones get their
    amount, in order, from `carry` ((meter, customer) -> usage assigned but not yet sent,
    updated as it goes); the others keep theirs. A push with nothing whole to send is
    delivered as it is (SENT, no request); one that cannot be sent is REJECTED with why."""
    out = []
    for p in pushes:
        if p.first_attempt_ms or p.sent is not None:
            out.append(p.moved(status, first_attempt_ms=at))  # its amount is fixed
        else:
            out.append(_one(p, rules.get(p.meter, _EXACT_RULE), status, carry, at))
    return out


def _one(p: Push, rule: Rule, status: int, carry: dict[tuple[str, str], Decimal], at: int) -> Push:
    key = (p.meter, p.customer_id)
    total = p.value
    if rule.one:
        return p.moved(status, first_attempt_ms=at, sent=Decimal(1))
    if rule.format == "whole" and rule.carries:
        total = EXACT.add(carry.get(key, Decimal(0)), p.value)
        amount = max(Decimal(0), floor(total))
    elif rule.format == "whole" and p.value != floor(p.value):
        why = (
            f"value {exact(p.value)} is not a whole number and a {p.meter} value cannot "
            "carry (not a sum): set the meter's stripe_value_format to decimal"
        )
        return p.moved(REJECTED, first_attempt_ms=at, sent=Decimal(0), reason=why)
    else:
        amount = p.value
    n = part_count(amount, rule.format)
    if n > MAX_PARTS:
        why = f"value {exact(amount)} needs {n} meter events (at most {MAX_PARTS})"
        return p.moved(REJECTED, first_attempt_ms=at, sent=Decimal(0), reason=why)
    if rule.format == "whole" and rule.carries:
        carry[key] = EXACT.subtract(total, amount)
    if n == 0:
        return p.moved(SENT, first_attempt_ms=at, sent=amount, reason="nothing whole to send")
    return p.moved(status, first_attempt_ms=at, sent=amount)


def billed(p: Push) -> Decimal:
    """What Stripe bills for a delivered push (its exact value for rows sent before amounts
    were recorded)."""
    return p.value if p.sent is None else p.sent
