"""Migration 5: analyst views."""

from __future__ import annotations

from consumer.store.migrations._sql import USAGE_VIEWS, Step, rollup_view, totals_view

NUMBER = 5
NAME = "analyst views"
STEPS: list[Step] = [
    """CREATE VIEW IF NOT EXISTS usage_minutely AS
        SELECT meter, customer_id, window_start, sum_value, event_count, min_value, max_value,
               first_value, last_value,
               if(event_count = 0, 0, toDecimal128(sum_value / event_count, 9)) AS avg_value
        FROM usage_windows FINAL""",
    *(rollup_view(name, expr, col) for name, expr, col in USAGE_VIEWS),
    totals_view("CREATE VIEW IF NOT EXISTS", "usage_windows FINAL"),
]
