"""Transient is not invalid (P6): ClickHouse errors pause and retry; nothing is lost,
nothing is dead-lettered for an outage, totals stay exact."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.local.broker import TansuBroker
from consumer.local.demo import run_until_drained, stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.metrics import Metrics
from consumer.ops.totals import clickhouse_totals, side_counts
from consumer.store import Backend, open_store
from consumer.store.backend import StoreUnavailable
from consumer.store.migrations import migrate
from tests.integration.conftest import produce_sample
from tests.integration.store_wrap import Passthrough
from tests.integration.test_pipeline import ours

pytestmark = pytest.mark.integration


class FlakyStore(Passthrough):
    """A real backend that fails the first `n` calls touching each named table."""

    def __init__(self, inner: Backend, failures: dict[str, int]) -> None:
        super().__init__(inner)
        self.left = dict(failures)
        self.injected = 0

    def check(self, text: str) -> None:
        if any(word in text for word in ("CREATE ", "ALTER ", "schema_migrations")):
            return  # let the migrations through; fail the data path
        for table, n in self.left.items():
            if n and table in text:
                self.left[table] = n - 1
                self.injected += 1
                raise StoreUnavailable(f"injected failure on {table}")


def test_clickhouse_errors_mid_sequence_are_retried_without_loss(
    broker: TansuBroker, emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    run = produce_sample(broker, emulator, tmp_path, unique, 8_000, 6, seed=17)
    settings, sample, ends, prefix = run.settings, run.sample, run.ends, run.prefix
    # Fail inside the sequence: after the intent (ledger insert), at the window recompute,
    # and at the done row; and during the emitter's outbox reads.
    store = open_store(settings.clickhouse)
    migrate(store)  # the data path is under test, not the schema's
    flaky = FlakyStore(
        store,
        {
            "usage_events": 3,
            "INSERT INTO usage_windows": 2,
            "stripe_pushes": 2,
        },
    )
    metrics = Metrics()
    try:
        run_until_drained(settings, ends, timeout=180, metrics=metrics, quiet=True, store=flaky)
    finally:
        flaky.close()
    assert flaky.injected == 7
    # every failure counted once, by the stage that retried it (the alerts read these)
    errors = {
        stage: metrics.registry.get_sample_value(
            "usage_consumer_clickhouse_errors_total", {"stage": stage}
        )
        or 0
        for stage in ("ingest", "rollup", "emitter")
    }
    assert sum(errors.values()) == 7 and errors["rollup"] == 2, errors
    store = open_store(settings.clickhouse)
    try:
        assert clickhouse_totals(store, settings.meters) == sample.truth
        sides = side_counts(store)
    finally:
        store.close()
    assert ours(stripe_totals(settings, emulator.url), prefix) == sample.truth
    dead = sum(v for r, v in sides.items() if r != "late")
    assert dead == sample.kinds["invalid"] + sample.kinds["future"] + sample.kinds["undecodable"]
