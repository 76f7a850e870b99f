"""Everything a store needs before a process uses it, in one place: the schema, then the
table properties the configuration sets (fsync, retention), which a migration may reset."""

from __future__ import annotations

from consumer.config import ClickHouseConfig
from consumer.store.backend import Backend
from consumer.store.cluster import cluster_of
from consumer.store.durability import apply_fsync
from consumer.store.migrations import migrate
from consumer.store.retention import apply_retention


def prepare_store(store: Backend, cfg: ClickHouseConfig) -> list[int]:
    """Apply pending migrations and the configured table properties; returns the
    migrations applied now."""
    cluster = cluster_of(cfg)
    applied = migrate(store, cluster)
    apply_fsync(store, cfg.fsync_after_insert, cluster)
    apply_retention(store, cfg.retention, cluster)
    return applied
