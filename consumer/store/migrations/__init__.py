"""The ClickHouse schema as numbered migrations, one module each (mNN_*.py), applied in
order and recorded in schema_migrations.

Every table is keyed by a deterministic identity (P3): writing the same rows twice
converges under FINAL. Analysts read the views at the end, never the raw tables.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

from consumer.store.backend import Backend
from consumer.store.migrations._sql import Step


def _load() -> list[tuple[int, str, list[Step]]]:
    """Every mNN_*.py module of this package, in order; each names its own NUMBER, which
    must be its file's and follow the one before (a gap or a twin is a bug, raised here)."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        match = re.fullmatch(r"m(\d+)_\w+", info.name)
        if match:
            module = importlib.import_module(f"{__name__}.{info.name}")
            found.append((int(match.group(1)), module))
    found.sort(key=lambda x: x[0])
    for expected, (number, module) in enumerate(found, start=1):
        if number != expected or number != module.NUMBER:
            raise RuntimeError(f"migration {module.__name__}: expected number {expected}")
    return [(m.NUMBER, m.NAME, m.STEPS) for _, m in found]


MIGRATIONS: list[tuple[int, str, list[Step]]] = _load()


def migrate(store: Backend) -> list[int]:
    """Apply pending migrations; returns the versions applied now."""
    store.command(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, "
        "applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = ReplacingMergeTree "
        "ORDER BY version"
    )
    done = {int(r[0]) for r in store.query("SELECT version FROM schema_migrations FINAL")}
    applied = []
    for version, name, statements in MIGRATIONS:
        if version in done:
            continue
        for step in statements:
            if isinstance(step, str):
                store.command(step)
            else:
                step(store)
        store.command(
            "INSERT INTO schema_migrations (version, name) VALUES ({v:UInt32}, {n:String})",
            {"v": version, "n": name},
        )
        applied.append(version)
    return applied
