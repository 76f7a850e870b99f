"""The run-path fuzz, CI-sized (tests/fuzz/run.py): 10,000 random, mutated and hand-made bad
messages among valid events through Tansu into a `usage-consumer run` process; the process
survives and stops cleanly, dead letters are exactly the bad messages by coordinates, and
ClickHouse and the emulator hold exactly the oracle's totals. The seed is printed;
FUZZ_SEED=<n> (and FUZZ_NOW_MS for the record time) replays a run;
`python -m tests.fuzz run --messages N` runs it larger."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.fuzz.run import run

pytestmark = pytest.mark.integration


def test_fuzzed_messages_through_the_run_path(tmp_path: Path) -> None:
    seed = int(os.environ.get("FUZZ_SEED") or random.SystemRandom().randrange(10**6))
    now = int(os.environ["FUZZ_NOW_MS"]) if os.environ.get("FUZZ_NOW_MS") else None
    report = run(10_000, seed, tmp_path, timeout=120, now_ms=now)
    lines = "\n".join(report.lines())
    print(lines)
    assert report.ok, lines
    assert report.numbers["dead"] > 3000 and report.numbers["accepted"] > 5000, lines
