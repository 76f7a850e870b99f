"""Shared fixtures: real local services started once per test session on free ports."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator

import pytest

from consumer.local.broker import TansuBroker

_names = itertools.count(1)


@pytest.fixture(scope="session")
def broker() -> Iterator[TansuBroker]:
    with TansuBroker() as b:
        yield b
        gc.collect()  # free Kafka clients held in callback cycles before the broker stops


@pytest.fixture
def unique() -> str:
    """A short name unique within the session: topics, groups and customers don't collide."""
    return f"t{next(_names)}"
