"""Migration 6: classification configs by hash."""

from __future__ import annotations

from consumer.store.migrations._sql import Step

NUMBER = 6
NAME = "classification configs by hash"
STEPS: list[Step] = [
    # The configuration each intent's hash names, so a range re-formed after a config
    # change is classified exactly as its first attempt was (P1).
    """CREATE TABLE IF NOT EXISTS config_versions (
        config_hash String,
        body String,
        written_at DateTime64(3, 'UTC') DEFAULT now64(3)
    ) ENGINE = ReplacingMergeTree
    ORDER BY config_hash""",
]
