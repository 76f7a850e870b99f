"""The CI-sized crash run: every kill point, 20+ random kills, faulted dependencies,
`dlq redrive`, `replay` and `reconcile --repair` killed and run again; ground
truth, ClickHouse and Stripe must agree per customer, meter and hour. `make chaos` runs
the full matrix. The seed is printed; CHAOS_SEED=<n> replays a run."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.chaos import repair
from tests.chaos.__main__ import report
from tests.chaos.harness import POINTS, Harness
from tests.chaos.scenarios import matrix

pytestmark = pytest.mark.integration


def test_ci_chaos_run_loses_and_doubles_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    print(f"chaos seed={seed} (CHAOS_SEED={seed} replays it)")
    harness = Harness(tmp_path, seed)
    outcomes = [harness.run(sc) for sc in matrix(full=False, seed=seed)]
    # replay and reconcile --repair killed mid-way and run again (tests/chaos/repair.py)
    outcomes.append(repair.run_scenario(tmp_path, seed))
    lines = "\n".join(o.line() for o in outcomes)
    assert report(outcomes) == 0, f"seed={seed}\n{lines}"
    assert sum(o.kills for o in outcomes) >= 20 + len(POINTS), lines
