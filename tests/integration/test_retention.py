"""Retention: configured TTLs land on the tables once, expire what they should, and never
take what resuming, dedup or the windows still read."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.config import ConfigError, RetentionConfig, load_settings
from consumer.intent.state import DONE, RangeState, load_states, write_states
from consumer.store.chdb import ChdbBackend
from consumer.store.migrations import migrate
from consumer.store.retention import apply_retention

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000


def _ttls(store: ChdbBackend) -> dict[str, bool]:
    rows = store.query(
        "SELECT name, position(engine_full, ' TTL ') > 0 FROM system.tables "
        "WHERE database = currentDatabase()"
    )
    return {str(n): bool(t) for n, t in rows}


def test_ttls_follow_the_configuration_and_are_not_reapplied(tmp_path: Path) -> None:
    store = ChdbBackend(tmp_path / "chdb", "usage")
    migrate(store)
    default = RetentionConfig()
    assert sorted(apply_retention(store, default)) == [
        "dead_letters", "ingest_state", "late_events"
    ]  # fmt: skip
    assert apply_retention(store, default) == []  # unchanged: nothing re-applied
    ttls = _ttls(store)
    assert not ttls["usage_events"] and not ttls["usage_windows"]  # kept for ever by default
    kept = RetentionConfig(ledger_days=400, windows_days=800)
    assert sorted(apply_retention(store, kept)) == [
        "cancellations", "ledger_superseded", "usage_events", "usage_windows"
    ]  # fmt: skip
    assert _ttls(store)["usage_events"] and _ttls(store)["ledger_superseded"]
    assert sorted(apply_retention(store, default)) == [
        "cancellations", "ledger_superseded", "usage_events", "usage_windows"
    ]  # fmt: skip
    assert not _ttls(store)["usage_events"]
    store.close()


def test_expired_rows_go_and_the_state_a_restart_needs_stays(tmp_path: Path) -> None:
    """History older than its days is dropped by the merge; a partition idle for longer
    than the ingest history still resumes where it was (ingest_latest keeps no TTL)."""
    store = ChdbBackend(tmp_path / "chdb", "usage")
    migrate(store)
    apply_retention(store, RetentionConfig(ledger_days=71, ingest_history_days=30))
    (now_ms,) = store.query("SELECT toUnixTimestamp64Milli(now64(3))")[0]
    old, recent = int(now_ms) - 100 * DAY_MS, int(now_ms) - 10 * DAY_MS
    for i, at in enumerate((old, recent)):
        store.command(
            """INSERT INTO usage_events (meter, customer_id, event_id, event_time, value,
                                         topic, partition, offset, record_time, ver)
               VALUES ('m', 'c', {e:String}, fromUnixTimestamp64Milli({at:Int64}, 'UTC'), 1,
                       't', 0, {o:UInt64}, fromUnixTimestamp64Milli({at:Int64}, 'UTC'), 1)""",
            {"e": f"e{i}", "at": at, "o": i},
        )
    write_states(store, "g", "t", 1, old, [RangeState(0, 0, 10, DONE, 1, "{}")])
    write_states(store, "g", "t", 1, old + 1, [RangeState(1, 0, 20, DONE, 1, "{}")])
    write_states(store, "g", "t", 1, recent, [RangeState(1, 20, 30, DONE, 1, "{}")])
    for table in ("usage_events", "ingest_state", "ingest_latest"):
        store.command(f"OPTIMIZE TABLE {table} FINAL")
    assert store.query("SELECT event_id FROM usage_events") == [("e1",)]
    assert store.query("SELECT partition, range_end FROM ingest_state") == [(1, 30)]
    states = load_states(store, "g", "t", [0, 1])
    assert {p: s.range_end for p, s in states.items()} == {0: 10, 1: 30}
    store.close()


def test_a_ledger_kept_shorter_than_a_cancel_reaches_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"ledger_days must be 0 \(keep\) or at least 71"):
        load_settings(clickhouse={"retention": {"ledger_days": 40}})
    assert load_settings(clickhouse={"retention": {"ledger_days": 71}})
