"""Per-customer totals from ClickHouse, each meter under its own aggregation."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from consumer.config import MeterConfig
from consumer.exact import truncated_mean
from consumer.store.backend import Backend

Totals = dict[tuple[str, str], Decimal]  # (customer, meter) -> value


def clickhouse_totals(
    store: Backend, meters: Sequence[MeterConfig], customer: str | None = None
) -> Totals:
    rows = store.query(
        """SELECT customer_id, meter, toString(sum_value), event_count, toString(min_value),
                  toString(max_value), toString(first_value), toString(last_value)
           FROM usage_totals
           WHERE {c:String} = '' OR customer_id = {c:String}
           ORDER BY customer_id, meter""",
        {"c": customer or ""},
    )
    by_name = {m.name: m for m in meters}
    out: Totals = {}
    for cust, meter, s, n, lo, hi, first, last in rows:
        m = by_name.get(str(meter))
        if m is None:
            continue
        values = aggregation_values(s, n, lo, hi, first, last)
        out[(str(cust), str(meter))] = values[m.aggregation]
    return out


def aggregation_values(
    s: object, n: object, lo: object, hi: object, first: object, last: object
) -> dict[str, Decimal]:
    """One window row (decimals as strings, count as int) as every aggregation's value."""
    count = int(str(n))
    return {
        "sum": Decimal(str(s)),
        "count": Decimal(count),
        "min": Decimal(str(lo)),
        "max": Decimal(str(hi)),
        "first": Decimal(str(first)),
        "last": Decimal(str(last)),
        "avg": truncated_mean(Decimal(str(s)), count) if count else Decimal(0),
    }


def side_counts(store: Backend) -> dict[str, int]:
    """Dead letters by reason plus late events: what did not reach the totals, and why."""
    out = {
        str(r): int(n)
        for r, n in store.query(
            "SELECT reason, count() FROM dead_letters FINAL GROUP BY reason ORDER BY reason"
        )
    }
    late = store.query("SELECT count() FROM late_events FINAL")
    out["late"] = int(late[0][0])
    return out


def correction_counts(store: Backend) -> dict[str, int]:
    """Cancels recorded, and what taking them back from Stripe came to, by outcome."""
    out = {
        str(o): int(n)
        for o, n in store.query(
            "SELECT outcome, count() FROM stripe_corrections FINAL GROUP BY outcome ORDER BY 1"
        )
    }
    out["cancels"] = int(store.query("SELECT count() FROM cancellations FINAL")[0][0])
    return out


def late_event_ids(store: Backend) -> set[str]:
    return {str(r[0]) for r in store.query("SELECT event_id FROM late_events FINAL")}


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
