"""`make chaos` (full matrix) or `python -m tests.chaos --ci` (the CI-sized run)."""

from __future__ import annotations

import argparse
import random
import sys
from decimal import Decimal
from pathlib import Path

from tests.chaos import repair
from tests.chaos.harness import Harness, Outcome
from tests.chaos.scenarios import matrix


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos")
    ap.add_argument("--ci", action="store_true", help="the smaller run part of make test")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--workdir", default=".chaos")
    ap.add_argument("--only", default=None, help="run one scenario by name")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    print(
        f"chaos: seed={seed} ({'ci' if args.ci else 'full'}; rerun with --seed {seed})", flush=True
    )
    harness = Harness(Path(args.workdir), seed)
    outcomes: list[Outcome] = []
    for sc in matrix(full=not args.ci, seed=seed):
        if args.only and sc.name != args.only:
            continue
        outcome = harness.run(sc)
        outcomes.append(outcome)
        print(outcome.line(), flush=True)
    if args.only in (None, "repair"):  # replay and reconcile --repair killed
        outcome = repair.run_scenario(Path(args.workdir), seed)
        outcomes.append(outcome)
        print(outcome.line(), flush=True)
    return report(outcomes)


def report(outcomes: list[Outcome]) -> int:
    lost = sum((o.lost for o in outcomes), Decimal(0))
    doubled = sum((o.doubled for o in outcomes), Decimal(0))
    kills = sum(o.kills for o in outcomes)
    events = sum(o.events for o in outcomes)
    print(
        f"chaos: scenarios={len(outcomes)} kills={kills} events={events} "
        f"lost={lost} doubled={doubled}",
        flush=True,
    )
    return 0 if outcomes and all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
