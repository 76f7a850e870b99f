"""Two instances receive copies of the same event ids on different partitions at the same
instants, each copy stamped by its producer at another time (a retry that re-stamped the
event an hour later), so the two copies have different ledger identities. Both poll loops
run at once, so both copies are usually classified before either is written: neither can
see the other when it asks the ledger.

Every (meter, event id) must still count once, whatever partition, instance or stamp its
copies have: each customer's total in ClickHouse and at Stripe equals the truth, and
ClickHouse and Stripe agree hour by hour (they counted the same copy). Nothing here tells
the consumer which copy to prefer; the test only checks that one, the same one in both
places, counts.

Run twice: as two instances of one process (they share the ledger lock, so the second
classification sees the first copy), and as two processes would run (a lock each: both
copies are accepted and written, and settled afterwards, consumer/sinks/copies.py). Then a
per-event meter's one push may carry either copy's stamp, so only the aggregated meter's
hours are held equal there (docs/limits.md).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from decimal import Decimal

import pytest

from consumer.config import Settings
from consumer.local.broker import TansuBroker
from consumer.local.demo import stripe_totals
from consumer.local.emulator import EmulatorServer
from consumer.ops.totals import Totals, clickhouse_totals
from consumer.store import Backend, open_store
from tests.integration.conftest import (
    HourKey,
    clickhouse_hourly,
    explain_totals,
    stripe_hourly,
    wait_for,
    wait_outbox_drained,
)
from tests.integration.test_pipeline import ours
from tests.integration.test_two_instances import (
    Both,
    Ev,
    committed,
    poll_loops,
    split_partitions,
    truth,
    two_pipelines,
    two_settings,
)

pytestmark = pytest.mark.integration

ROUNDS, PER_ROUND = 4, 150
SHIFT_MS = 61 * 60_000  # the second copy's stamp: in the next hour
METERED = {"api_call": "api_calls", "tokens": "tokens"}


@dataclass
class Seen:
    totals: Totals
    stripe: Totals
    hourly: dict[HourKey, Decimal]
    stripe_hours: dict[HourKey, Decimal]
    explain: str


@dataclass
class Outcome:
    events: list[Ev]
    owners: dict[str, set[int]]
    seen: Seen
    processes: int


def _events(rng: random.Random, base: int, prefix: str) -> list[Ev]:
    out = []
    for i in range(ROUNDS * PER_ROUND):
        name = rng.choice(list(METERED))
        value = Decimal(rng.randint(1, 10) if name == "api_call" else rng.randint(1, 5000))
        # ids unique to the run: Stripe drops an identifier it has seen (both runs share it)
        out.append(
            Ev(f"{prefix}{i:05d}", name, f"{prefix}{rng.randrange(6)}", value, base + i * 400)
        )
    return out


def _read(store: Backend, settings: Settings, url: str, want: Totals, prefix: str) -> Seen:
    totals = ours(clickhouse_totals(store, settings.meters), prefix)
    return Seen(
        totals,
        ours(stripe_totals(settings, url), prefix),
        clickhouse_hourly(store, settings.meters, prefix),
        stripe_hourly(url, settings.meters, prefix),
        explain_totals(store, totals, want),
    )


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "two-processes"])
def outcome(
    broker: TansuBroker,
    emulator: EmulatorServer,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[Outcome]:
    processes = int(request.param)
    name = f"concopies{processes}"
    prefix = f"cus_{name}_"
    settings, quiet = two_settings(broker, emulator, tmp_path_factory.mktemp(name), name)
    k = settings.kafka
    seed = int(time.time()) % 100_000
    print(f"test_concurrent_copies seed={seed}")
    rng = random.Random(seed)
    # The first copies 80 minutes old, the second ones 19: both inside the allowed hour of
    # lateness of their own partition, neither in the future.
    events = _events(rng, int(time.time() * 1000) - 80 * 60_000, prefix)
    store = open_store(settings.clickhouse)
    pipes = two_pipelines(settings, quiet, store)
    if processes == 2:
        pipes["B"].ingestor.ctx.ledger_lock = threading.Lock()
    a = pipes["A"]
    assert a.emitter is not None
    stop, halt = threading.Event(), threading.Event()
    emitter = threading.Thread(target=a.emitter.run, args=(stop,), name="emitter")
    errors: list[BaseException] = []
    loops = poll_loops(pipes, halt, errors)
    both = Both(broker.bootstrap, k.topic)
    try:
        owners = split_partitions(pipes)
        emitter.start()
        for t in loops:
            t.start()
        ends: dict[int, int] = {}
        for r in range(ROUNDS):
            chunk = events[r * PER_ROUND : (r + 1) * PER_ROUND]
            # each id's two copies back to back: the original to partition 0, the copy
            # re-stamped an hour later to partition 1
            both.send(chunk, (0,))
            ends = both.send([replace(e, ts=e.ts + SHIFT_MS) for e in chunk], (1,))
        wait_for(lambda: all(committed(p, ends) for p in pipes.values()) or bool(errors), "both")
        halt.set()
        for t in loops:
            t.join(60)
        assert not errors, errors
        assert {n: set(p.ingestor.tracks) for n, p in pipes.items()} == owners
        for p in pipes.values():
            p.rollup.wait()
        wait_outbox_drained(a)
        seen = _read(store, settings, emulator.url, truth(events), prefix)
        (settled,) = store.query("SELECT count() FROM ledger_superseded FINAL")[0]
        print(f"test_concurrent_copies processes={processes}: copies settled={settled}")
        yield Outcome(events, owners, seen, processes)
    finally:
        halt.set()
        stop.set()
        for t in loops:
            if t.is_alive():
                t.join(60)
        if emitter.is_alive():
            emitter.join(60)
        a.emitter.close()
        for p in pipes.values():
            p.close()
        store.close()


def test_each_instance_owned_one_partition(outcome: Outcome) -> None:
    assert sorted(len(v) for v in outcome.owners.values()) == [1, 1]


def test_each_event_counts_once_in_clickhouse(outcome: Outcome) -> None:
    assert outcome.seen.totals == truth(outcome.events), outcome.seen.explain


def test_each_event_counts_once_at_stripe(outcome: Outcome) -> None:
    assert outcome.seen.stripe == truth(outcome.events)


def test_clickhouse_and_stripe_counted_the_same_copy(outcome: Outcome) -> None:
    """Hour by hour: the copies are an hour apart, so a different choice shows."""
    if outcome.processes == 1:
        assert outcome.seen.hourly == outcome.seen.stripe_hours
    else:  # the aggregated meter's pushes are planned from the settled windows
        aggregated = "api_calls"

        def of(hours: dict[HourKey, Decimal]) -> dict[HourKey, Decimal]:
            return {k: v for k, v in hours.items() if k[1] == aggregated}

        assert of(outcome.seen.hourly) == of(outcome.seen.stripe_hours)
        assert of(outcome.seen.hourly)
