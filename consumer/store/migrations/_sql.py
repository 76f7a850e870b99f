"""What several migrations share: the step type, the insert-dedup window, the views."""

from __future__ import annotations

from collections.abc import Callable

from consumer.store.backend import Backend

# A statement, or a step that must look before it acts (a copy that may have been cut short).
Step = str | Callable[[Backend], None]

DEDUP = "non_replicated_deduplication_window = 1000"


def rollup_view(
    name: str,
    grain: str,
    column: str,
    create: str = "CREATE VIEW IF NOT EXISTS",
    source: str = "usage_windows FINAL",
) -> str:
    """Hour, day and month views derive from the minute windows the same way."""
    return f"""{create} {name} AS
        SELECT meter, customer_id, {grain} AS {column},
               sum(sum_value) AS sum_value, sum(event_count) AS event_count,
               min(min_value) AS min_value, max(max_value) AS max_value,
               argMin(first_value, first_time) AS first_value,
               argMax(last_value, last_time) AS last_value
        FROM {source} GROUP BY meter, customer_id, {column}"""


def totals_view(create: str, source: str) -> str:
    return f"""{create} usage_totals AS
        SELECT meter, customer_id,
               sum(sum_value) AS sum_value, sum(event_count) AS event_count,
               min(min_value) AS min_value, max(max_value) AS max_value,
               argMin(first_value, first_time) AS first_value,
               argMax(last_value, last_time) AS last_value,
               min(window_start) AS first_window, max(window_start) AS last_window
        FROM {source} GROUP BY meter, customer_id"""


USAGE_VIEWS = [
    ("usage_hourly", "toStartOfHour(window_start)", "hour"),
    ("usage_daily", "toDate(window_start)", "day"),
    ("usage_monthly", "toStartOfMonth(window_start)", "month"),
]
