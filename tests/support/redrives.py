"""What `dlq redrive` recorded, read by the tests that wait for its copies."""

from __future__ import annotations

from consumer.store.backend import Backend


def copy_ends(store: Backend) -> dict[int, int]:
    """Per partition, the end of the copies `dlq redrive` recorded as sent (a copy a killed
    run produced unrecorded was sent again, and recorded, later)."""
    rows = store.query(
        "SELECT copy_partition, max(copy_offset) + 1 FROM dlq_redrives WHERE state = 2 GROUP BY 1"
    )
    return {int(p): int(o) for p, o in rows}
