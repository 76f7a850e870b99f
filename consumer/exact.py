"""Exact decimal arithmetic for money-adjacent sums.

Python's default decimal context keeps 28 significant digits, so adding Decimal(38, 9)
values (up to 38 digits) would round silently. Every sum and rendering of usage values in
this package goes through EXACT, which holds far more digits than any total can have, and
traps Inexact so a rounding would raise instead of billing a wrong amount.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Context, Decimal, Inexact

EXACT = Context(prec=80, traps=[Inexact])
_WIDE = Context(prec=80)
NINE_PLACES = Decimal("1e-9")


def exact_sum(values: Iterable[Decimal]) -> Decimal:
    total = Decimal(0)
    for v in values:
        total = EXACT.add(total, v)
    return total


def truncated_mean(total: Decimal, count: int) -> Decimal:
    """total / count truncated to 9 places, as ClickHouse's Decimal(38, 9) division does."""
    return _WIDE.divide(total, Decimal(count)).quantize(NINE_PLACES, "ROUND_DOWN", _WIDE)


def exact(value: Decimal) -> str:
    """Decimal as a plain string without exponent or trailing zeros ("10", "0.5")."""
    text = format(value.normalize(EXACT), "f")
    return text if "." not in text else text.rstrip("0").rstrip(".") or "0"
