"""`usage-consumer run` with several consumer instances in one process, sharing one store.

    python -m tests.chaos.instances 2

Configured like `run` (the environment), with the same /metrics and signals, and armed like
`tests/support/armed.py`.
With chDB one process holds a store, so instances that share it live in one process, each
with its own Kafka consumer in the group (so the partitions are split between them and
rebalance as they start and stop), its own rollup thread and its own batches; only the
first sends to Stripe (one emitter a store), and its emitter counts as behind while any
instance's windows wait for their recompute. The crash harness runs it to have copies of an
event classified by two instances at once, and SIGKILLs it like any consumer process.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence

from consumer.app import Pipeline, build_emitter, build_pipeline
from consumer.config import load_settings
from consumer.metrics import Metrics
from consumer.ops.health import Health, serve
from tests.support.armed import arm

log = logging.getLogger("instances")


class AllRollups:
    """The emitter's upstream (consumer/emitter/loop.py: Upstream): every instance's jobs."""

    def __init__(self, pipes: list[Pipeline]) -> None:
        self._pipes = pipes

    @property
    def behind(self) -> int:
        return sum(p.rollup.behind for p in self._pipes)

    @property
    def submitted(self) -> int:
        return sum(p.rollup.submitted for p in self._pipes)


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    n = int(argv[0]) if argv else 2
    settings = load_settings()
    quiet = load_settings(stripe={"enabled": False})
    armed = arm()
    clock, metrics = armed.clock, Metrics()
    health = Health(clock)
    serve(settings.pipeline.metrics_host, settings.pipeline.metrics_port, metrics, health)
    store = armed.open_store(settings.clickhouse)
    # One set of metrics for the process, as the harness reads one /metrics: the partitions
    # owned add up, and any instance's window job resets the emitter's idle gauge.
    pipes = [build_pipeline(quiet, clock, metrics, health, store)]
    pipes += [build_pipeline(quiet, clock, metrics, Health(clock), store) for _ in range(n - 1)]
    # The one emitter is behind (not idle) while any instance's windows wait for their
    # recompute: it plans from those windows, and the harness drains on its idle gauge.
    pipes[0].emitter = build_emitter(settings, store, clock, metrics, AllRollups(pipes))
    stop = threading.Event()
    failures: list[BaseException] = []

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping %d instances", signum, len(pipes))
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def run(p: Pipeline) -> None:
        try:
            p.run(stop)
        except BaseException as exc:  # one instance failing stops them all, loudly
            failures.append(exc)
            log.exception("an instance failed")
            stop.set()

    threads = [
        threading.Thread(target=run, args=(p,), name=f"instance-{i}") for i, p in enumerate(pipes)
    ]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.5)
    store.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
