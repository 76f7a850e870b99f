"""Migration 17: the epochs of the emitter lease."""

from __future__ import annotations

from consumer.store.migrations._sql import Step

NUMBER = 17
NAME = "emitter lease epochs"
STEPS: list[Step] = [
    # One row each time a process takes the emitter lease (consumer/emitter/lease.py): the
    # epoch is the offset of its claim on the control topic, so later holders have higher
    # ones. A holder checks that its epoch is still the highest before it plans or sends.
    """CREATE TABLE IF NOT EXISTS emitter_epochs (
        group_id String,
        epoch UInt64,
        holder String,
        registered_at DateTime64(9, 'UTC') DEFAULT now64(9, 'UTC')
    ) ENGINE = ReplacingMergeTree
    ORDER BY (group_id, epoch)""",
]
