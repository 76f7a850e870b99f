"""Migration 18: the outbox's open work, kept apart from its history."""

from __future__ import annotations

from consumer.store.migrations._sql import Step

# Every emitter cycle asks which pushes still wait: to be sent, checked, held or re-dated.
# Read from `stripe_pushes` with FINAL, that question merged the whole outbox, every push
# ever sent. `stripe_open` names the pushes that are not settled (sent or cancelled):
# awaiting ones (pending, attempted, re-dated) and ones held for a person (expired,
# rejected; `held` = 1 once stripe_pushes was seen to hold them so). The rules that keep it
# from ever hiding an open push are in consumer/emitter/plan/outbox.py. `version` orders a
# push's rows as its ranks do, a checked hold after the unchecked one.
NUMBER = 18
NAME = "stripe open work"
STEPS: list[Step] = [
    """CREATE TABLE IF NOT EXISTS stripe_open (
        identifier String,
        status_rank UInt8,
        held UInt8,
        version UInt8,
        stripe_timestamp DateTime64(3, 'UTC')
    ) ENGINE = ReplacingMergeTree(version)
    ORDER BY identifier""",
    # The pushes not settled when this migration ran (a re-run adds the same rows again,
    # which the merge collapses).
    """INSERT INTO stripe_open (identifier, status_rank, held, version, stripe_timestamp)
        SELECT identifier, status_rank, 0, status_rank * 2, stripe_timestamp
        FROM stripe_pushes FINAL WHERE status_rank NOT IN (2, 6, 8)""",
]
