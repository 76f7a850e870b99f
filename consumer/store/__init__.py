"""ClickHouse access: the backend interface, its two implementations, and the schema."""

from __future__ import annotations

from consumer.config import ClickHouseConfig
from consumer.store.backend import Backend, ChdbBackend, ServerBackend, StoreError, StoreLocked

__all__ = ["Backend", "StoreError", "StoreLocked", "open_store"]


def open_store(cfg: ClickHouseConfig) -> Backend:
    """Open the configured backend (chDB in process, or a ClickHouse server)."""
    if cfg.backend == "chdb":
        return ChdbBackend(cfg.chdb_path, cfg.database, fsync=cfg.fsync_after_insert)
    return ServerBackend(
        cfg.host,
        cfg.port,
        cfg.username,
        cfg.password.get_secret_value(),
        cfg.database,
        secure=cfg.secure,
        fsync=cfg.fsync_after_insert,
    )
