"""The classification configurations by hash (table config_versions, migration 6): a range
re-formed after a configuration change is classified with the one it was first formed with
(P1)."""

from __future__ import annotations

from consumer.store.backend import Backend


def record_config(store: Backend, config_hash: str, body: str) -> None:
    if not store.query(
        "SELECT 1 FROM config_versions WHERE config_hash = {h:String}", {"h": config_hash}
    ):
        store.command(
            "INSERT INTO config_versions (config_hash, body) VALUES ({h:String}, {b:String})",
            {"h": config_hash, "b": body},
        )


def load_config(store: Backend, config_hash: str) -> str | None:
    rows = store.query(
        "SELECT body FROM config_versions FINAL WHERE config_hash = {h:String}", {"h": config_hash}
    )
    return str(rows[0][0]) if rows else None
