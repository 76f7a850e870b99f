"""The emitter alone, with the crash harness's hooks armed, until a cycle finds nothing to
do: the repair scenario SIGKILLs it while it delivers what `replay` and `reconcile --repair`
queued. No lease: the scenario runs one emitter at a time on its store.

    USAGE_CONSUMER_FAULT=after_stripe_2xx:1 python -m tests.chaos.drain config.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

from consumer.app import build_emitter
from consumer.clock import SystemClock
from consumer.config import load_settings
from consumer.metrics import Metrics
from consumer.store import open_store
from tests.support.armed import arm

CYCLES = 50


def main(config: Path) -> int:
    arm()
    settings = load_settings(config)
    store = open_store(settings.clickhouse)
    emitter = build_emitter(settings, store, SystemClock(), Metrics())
    try:
        for _ in range(CYCLES):
            if emitter.run_once() == 0:
                return 0
        print(f"the emitter still had work after {CYCLES} cycles", file=sys.stderr)
        return 1
    finally:
        emitter.close()
        store.close()


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
