"""The emitter lease (consumer/emitter/lease.py) on a real broker and store: one holder at
a time, epochs that only grow, a clean hand-over on close, and a holder that stopped
polling (a paused process) deposed, fenced out, and never re-claiming behind the new one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from consumer.app import build_emitter
from consumer.clock import SystemClock
from consumer.config import KafkaConfig, load_settings
from consumer.emitter.lease import Deposed, EmitterLease
from consumer.ingest.kafka import ensure_control_topic, lease_config
from consumer.local.broker import TansuBroker
from consumer.metrics import Metrics
from consumer.store.chdb import ChdbBackend
from consumer.store.migrations import migrate
from tests.integration.conftest import METERS, STRIPE_KEY

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbBackend]:
    backend = ChdbBackend(Path(tmp_path_factory.mktemp("lease")) / "chdb", "usage")
    migrate(backend)
    yield backend
    backend.close()


def _wait(what: str, until: Callable[[], bool], leases: list[EmitterLease], limit: float) -> None:
    """Poll every lease (as each emitter thread does) until `until` holds."""
    deadline = time.monotonic() + limit
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {limit} s: {what}")
        for lease in leases:
            lease.hold()
        time.sleep(0.05)


def _config(broker: TansuBroker, unique: str) -> KafkaConfig:
    """A group and control topic of the test's own, a short session (a quick hand-over)."""
    cfg = KafkaConfig(
        bootstrap_servers=broker.bootstrap,
        group_id=unique,
        control_topic=f"{unique}.control",
        consumer_librdkafka={"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"},
    )
    ensure_control_topic(cfg)
    return cfg


def _lease(
    cfg: KafkaConfig,
    store: ChdbBackend,
    overrides: dict[str, str] | None = None,
    metrics: Metrics | None = None,
) -> EmitterLease:
    assert cfg.control_topic is not None
    conf = {**lease_config(cfg), **(overrides or {})}
    producer = Producer({"bootstrap.servers": cfg.bootstrap_servers})
    return EmitterLease(
        Consumer(conf), producer, store, cfg.group_id, cfg.control_topic, metrics or Metrics()
    )


def test_one_holder_and_a_clean_hand_over(
    broker: TansuBroker, store: ChdbBackend, unique: str
) -> None:
    cfg = _config(broker, unique)
    ensure_control_topic(cfg)  # there already: nothing to do
    a, b = _lease(cfg, store), _lease(cfg, store)
    both = [a, b]
    _wait("one holder", lambda: (a.epoch is None) != (b.epoch is None), both, 60)
    for _ in range(20):  # and it stays one
        assert sum(lease.hold() is not None for lease in both) == 1
        time.sleep(0.05)
    first, other = (a, b) if a.epoch is not None else (b, a)
    epoch = first.epoch
    assert epoch is not None
    first.fence()  # the holder with the newest epoch passes
    with pytest.raises(Deposed):
        other.fence()
    started = time.monotonic()
    first.close()  # leaves the group: no timeout to wait for
    _wait("the other takes over", lambda: other.epoch is not None, [other], 30)
    handover = time.monotonic() - started
    assert other.epoch is not None and other.epoch > epoch
    other.fence()
    print(f"lease hand-over after a clean close: {handover:.1f} s")
    other.close()


def test_a_paused_holder_is_deposed_and_fenced_out(
    broker: TansuBroker, store: ChdbBackend, unique: str
) -> None:
    cfg = _config(broker, unique)
    # A holder that stops polling past max.poll.interval.ms is what a paused process is.
    a = _lease(cfg, store, {"max.poll.interval.ms": "7000"})
    _wait("a holds", lambda: a.epoch is not None, [a], 60)
    b = _lease(cfg, store)
    old = a.epoch
    assert old is not None
    _wait("b takes over from the silent a", lambda: b.epoch is not None, [b], 60)
    assert b.epoch is not None and b.epoch > old
    # `a` resumes: before it learns it was evicted, its fence already refuses it.
    with pytest.raises(Deposed, match="superseded"):
        a.fence()
    for _ in range(40):  # and it never claims again behind b's back
        assert a.hold() is None
        b.hold()
        time.sleep(0.05)
    b.fence()
    a.close()
    b.close()


def test_a_process_without_the_lease_never_reports_an_idle_outbox(
    broker: TansuBroker, store: ChdbBackend, unique: str
) -> None:
    """Only the holder's cycles see the outbox: a process that lost the lease (or never had
    it) reports 0, not the 1 of its last cycle as holder, which a drain check would trust."""
    cfg = _config(broker, unique)
    a = _lease(cfg, store)
    _wait("a holds", lambda: a.epoch is not None, [a], 60)
    metrics = Metrics()
    settings = load_settings(
        stripe={"api_key": STRIPE_KEY, "api_base": "http://127.0.0.1:9", "verify_meters": False},
        meters=METERS,
    )
    b = _lease(cfg, store, metrics=metrics)
    emitter = build_emitter(settings, store, SystemClock(), metrics, None, b)
    metrics.stripe_idle.set(1)  # as its last cycle as holder left it
    stop = threading.Event()
    thread = threading.Thread(target=emitter.run, args=(stop,))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while metrics.registry.get_sample_value("usage_consumer_stripe_outbox_idle") != 0:
            assert time.monotonic() < deadline, "a process without the lease reports idle"
            a.hold()
            time.sleep(0.05)
        assert b.epoch is None and a.epoch is not None
    finally:
        stop.set()
        thread.join()
        emitter.close()
        a.close()
