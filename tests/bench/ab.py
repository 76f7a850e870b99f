"""Phase (c) of `make bench` for two source trees side by side, on one sample and broker.

    git worktree add /tmp/before <commit>
    python -m tests.bench.ab /tmp/before        # the other tree: this checkout

What a change costs, measured the way the bench measures (c) (tests/bench/pipeline.py: the
whole consumer on a fresh store and group, from before its first poll to its last offset
visible), with both trees run in turn (before, after, before, after, ...) so a host whose
speed drifts moves both alike. Prints every run and the ratio of the medians; each run must
also leave ClickHouse equal to the ground truth. Sizes as for `make bench` (BENCH_EVENTS,
BENCH_CUSTOMERS, BENCH_PARTITIONS); `--rounds` pairs (default 3).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from consumer.local.broker import TansuBroker
from consumer.local.demo import produce_messages
from consumer.local.sample import generate
from tests.bench.child import run_child
from tests.bench.pipeline import SEED, TOPIC

_CHILD = """
import json, sys
from decimal import Decimal
from tests.bench.pipeline import pipeline
bootstrap, ends, workdir, group = json.loads(sys.argv[1])
r = pipeline(bootstrap, {int(k): v for k, v in ends.items()}, workdir, group)
r["totals"] = {k: str(Decimal(v).normalize()) for k, v in r["totals"].items()}
r.pop("requests", None)
print("AB-RESULT " + json.dumps(r))
"""


def _build(tree: Path) -> None:
    """The other tree needs its C decoder built in place (this one is installed)."""
    if not list((tree / "consumer").glob("_avrofast*.so")):
        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, check=True
        )


def _run(tree: Path, args: list[object]) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return run_child(_CHILD, args, "AB-RESULT", env, f"(c) in {tree}", cwd=tree)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.ab")
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path, nargs="?", default=Path.cwd())
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for tree in trees.values():
        _build(tree)
    events = int(os.environ.get("BENCH_EVENTS", 1_000_000))
    customers = int(os.environ.get("BENCH_CUSTOMERS", 10_000))
    partitions = int(os.environ.get("BENCH_PARTITIONS", 6))
    rates: dict[str, list[int]] = {k: [] for k in trees}
    exact = True
    with TansuBroker() as broker, tempfile.TemporaryDirectory(prefix="bench-ab-") as work:
        broker.create_topics({TOPIC: partitions, "usage.dlq": 1, "usage.late": 1})
        sample = generate(events, customers, partitions, int(time.time() * 1000), SEED)
        ends = produce_messages(sample.messages, broker.bootstrap, TOPIC)
        truth = {f"{c}|{m}": str(v.normalize()) for (c, m), v in sample.truth.items()}
        for i in range(args.rounds):
            for name, tree in trees.items():
                group = f"ab-{name}-{i}"
                r = _run(tree, [broker.bootstrap, ends, str(Path(work) / group), group])
                ok = r["totals"] == truth
                exact &= ok
                rates[name].append(int(str(r["events_per_s"])))
                print(
                    f"ab: round {i + 1} {name:6} {r['events_per_s']:>9,} events/s"
                    f"{'' if ok else ' NOT EXACT'}",
                    flush=True,
                )
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = Decimal(med["after"]) / Decimal(med["before"])
    print(
        f"ab: (c) median before {med['before']:,.0f}, after {med['after']:,.0f} events/s; "
        f"after/before {ratio:.3f} over {args.rounds} rounds; exact={exact}"
    )
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
