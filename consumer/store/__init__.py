"""ClickHouse access: the backend interface (backend.py), its two implementations (chdb.py,
server.py), and the schema (migrations/)."""

from __future__ import annotations

from consumer.config import ClickHouseConfig
from consumer.store.backend import Backend, StoreError, StoreLocked
from consumer.store.chdb import ChdbBackend
from consumer.store.server import ServerBackend

__all__ = ["Backend", "StoreError", "StoreLocked", "open_store"]


def open_store(cfg: ClickHouseConfig) -> Backend:
    """Open the configured backend (chDB in process, or a ClickHouse server)."""
    if cfg.backend == "chdb":
        return ChdbBackend(cfg.chdb_path, cfg.database)
    return ServerBackend(
        cfg.host,
        cfg.port,
        cfg.username,
        cfg.password.get_secret_value(),
        cfg.database,
        secure=cfg.secure,
    )
