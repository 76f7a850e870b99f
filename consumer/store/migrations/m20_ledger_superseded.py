"""Migration 20: ledger rows superseded by another copy of their event.

Two processes can each accept a copy of one (meter, event id) that its producer stamped in
different minutes: neither saw the other's row when it asked the ledger. Both rows stay
(the ledger never deletes); the window recompute leaves out the one named here
(consumer/sinks/settle.py). Keyed like the ledger, minute first, so the recompute reads
the minutes at hand only.
"""

from __future__ import annotations

from consumer.store.migrations._sql import Step

NUMBER = 20
NAME = "ledger superseded"
STEPS: list[Step] = [
    """CREATE TABLE IF NOT EXISTS ledger_superseded (
        meter LowCardinality(String),
        minute DateTime('UTC'),
        customer_id String,
        event_id String,
        written_at DateTime64(3, 'UTC') DEFAULT now64(3)
    ) ENGINE = ReplacingMergeTree
    PARTITION BY toYYYYMM(minute)
    ORDER BY (meter, minute, customer_id, event_id)""",
]
