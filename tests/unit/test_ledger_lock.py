"""The store's ledger lock: one per store (not per handle), and a turn released exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.config import ClickHouseConfig
from consumer.ingest.ledger_lock import Turn, ledger_lock


def test_one_lock_per_store_whatever_the_path_spelling(tmp_path: Path) -> None:
    a = ClickHouseConfig(chdb_path=tmp_path / "store")
    b = ClickHouseConfig(chdb_path=tmp_path / "x" / ".." / "store")
    other = ClickHouseConfig(chdb_path=tmp_path / "other")
    assert ledger_lock(a) is ledger_lock(b)
    assert ledger_lock(a) is not ledger_lock(other)
    server = ClickHouseConfig(backend="server", host="ch", database="usage")
    assert ledger_lock(server) is ledger_lock(server.model_copy())
    assert ledger_lock(server) is not ledger_lock(server.model_copy(update={"database": "x"}))


def test_a_turn_ends_when_the_ledger_is_written_and_only_once(tmp_path: Path) -> None:
    lock = ledger_lock(ClickHouseConfig(chdb_path=tmp_path / "turn"))
    with Turn(lock) as turn:
        assert lock.locked()
        turn.done()
        assert not lock.locked()
        assert lock.acquire(blocking=False)  # another instance's turn may begin here
        turn.done()  # a second done must not release the other instance's turn
        assert lock.locked()
        lock.release()
    assert not lock.locked()


def test_a_turn_that_fails_before_its_write_is_given_back(tmp_path: Path) -> None:
    lock = ledger_lock(ClickHouseConfig(chdb_path=tmp_path / "fail"))
    with pytest.raises(RuntimeError), Turn(lock):
        raise RuntimeError("ClickHouse went away")
    assert not lock.locked()
