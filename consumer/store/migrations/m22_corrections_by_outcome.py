"""Migration 22: corrections found by outcome without reading their history.

Each emitter cycle looks for decisions to adjust that a crash left unfinished (outcome
`adjusting`), and the overbilled gauge sums the `late` ones once a lease. The table is
keyed by bucket, so both read every correction ever recorded. A set index on the outcome
lets ClickHouse skip every granule holding none of the outcome asked for: a finished
decision's `adjusting` row is dropped when its part merges, so the cycle's read follows
the unfinished and the not yet merged, not the table's age.
"""

from __future__ import annotations

from consumer.store.migrations._sql import Step

NUMBER = 22
NAME = "corrections by outcome"
STEPS: list[Step] = [
    """ALTER TABLE stripe_corrections
       ADD INDEX IF NOT EXISTS by_outcome outcome TYPE set(16) GRANULARITY 1""",
    "ALTER TABLE stripe_corrections MATERIALIZE INDEX by_outcome SETTINGS mutations_sync = 1",
]
