"""What `clickhouse.fsync_after_insert` costs: the whole pipeline with it off and on, side by
side in one run.

    python -m tests.bench.fsync [--rounds 5] [--workdir DIR]

One seeded sample is produced once into a Tansu topic; each round runs phase (c) of
`make bench` (tests/bench/pipeline.py: the whole consumer on a fresh store and group, from
before its first poll to its last offset visible) once with fsync off and once with it on,
alternating which goes first, each in a process of its own with its store under DIR (a
real disk, never a tmpfs, where fsync costs nothing). Beside each run, what one small
insert costs alone: the price fsync adds to every insert, which the pipeline pays once per
table a batch. Prints every run, the medians and their ratios. Each run must leave
ClickHouse equal to the ground truth, and the "on" runs must have fsync set on every
MergeTree table. Sizes from BENCH_EVENTS (200,000), BENCH_CUSTOMERS (2,000),
BENCH_PARTITIONS (3). No timing is asserted anywhere in `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

# One run in a fresh process: the pipeline, then whether fsync is set on every table.
_CHILD = """
import json, sys
from pathlib import Path
from consumer.store.chdb import ChdbBackend
from tests.bench.pipeline import pipeline
from tests.integration.test_durability import fsync_by_table
bootstrap, ends, workdir, group = json.loads(sys.argv[1])
r = pipeline(bootstrap, {int(k): v for k, v in ends.items()}, workdir, group)
store = ChdbBackend(Path(workdir) / "chdb", "usage")
try:
    tables = fsync_by_table(store)
finally:
    store.close()
r["fsync_tables"] = [sum(tables.values()), len(tables)]
r.pop("requests", None)
print("FSYNC-RESULT " + json.dumps(r))
"""


# The cost of one small insert alone: a state row into ingest_state, `n` times.
_INSERTS = """
import json, sys, time
from pathlib import Path
from consumer.store.chdb import ChdbBackend
from consumer.store.durability import apply_fsync
from consumer.store.migrations import migrate
workdir, fsync, n = json.loads(sys.argv[1])
store = ChdbBackend(Path(workdir) / "chdb", "usage")
try:
    migrate(store)
    apply_fsync(store, fsync)
    started = time.perf_counter()
    for i in range(n):
        store.command(
            "INSERT INTO ingest_state (group_id, topic, partition, range_start, range_end, "
            f"state_rank, epoch, attempt, snapshot, written_at) VALUES ('g', 't', 0, {i}, "
            f"{i + 1}, 2, 1, 1, '{{}}', now64(3))"
        )
    print("INSERT-MS " + json.dumps((time.perf_counter() - started) / n * 1000))
finally:
    store.close()
"""


def _insert_ms(fsync: bool, workdir: Path, n: int = 100) -> float:
    """Milliseconds one small insert takes, with fsync on or off, on a store of its own."""
    proc = subprocess.run(
        [sys.executable, "-c", _INSERTS, json.dumps([str(workdir), fsync, n])],
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("INSERT-MS "))
    return float(json.loads(line[len("INSERT-MS ") :]))


def _run(fsync: bool, args: list[object]) -> dict[str, object]:
    env = {**os.environ, "USAGE_CONSUMER_CLICKHOUSE__FSYNC_AFTER_INSERT": str(fsync).lower()}
    return run_child(_CHILD, args, "FSYNC-RESULT", env, f"fsync={fsync}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.fsync")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the stores go: a real disk, not a tmpfs (default: the temp directory)",
    )
    args = ap.parse_args(argv)
    events = int(os.environ.get("BENCH_EVENTS", 200_000))
    customers = int(os.environ.get("BENCH_CUSTOMERS", 2_000))
    partitions = int(os.environ.get("BENCH_PARTITIONS", 3))
    rates: dict[bool, list[int]] = {False: [], True: []}
    small: dict[bool, list[float]] = {False: [], True: []}
    exact = True
    work = Path(tempfile.mkdtemp(prefix="bench-fsync-", dir=args.workdir))
    try:
        with TansuBroker() as broker:
            broker.create_topics({TOPIC: partitions, "usage.dlq": 1, "usage.late": 1})
            sample = generate(events, customers, partitions, int(time.time() * 1000), SEED)
            ends = produce_messages(sample.messages, broker.bootstrap, TOPIC)
            truth = {f"{c}|{m}": str(v) for (c, m), v in sample.truth.items()}
            print(f"fsync: {events:,} events, {partitions} partitions, stores in {work}")
            for i in range(args.rounds):
                for fsync in (False, True) if i % 2 == 0 else (True, False):
                    group = f"fsync-{'on' if fsync else 'off'}-{i}"
                    r = _run(fsync, [broker.bootstrap, ends, str(work / group), group])
                    ok = _same(r["totals"], truth)
                    set_on = r["fsync_tables"]
                    assert isinstance(set_on, list)
                    fsynced, tables = int(set_on[0]), int(set_on[1])
                    ok &= fsynced == (tables if fsync else 0)
                    exact &= ok
                    rates[fsync].append(int(str(r["events_per_s"])))
                    print(
                        f"fsync: round {i + 1} {'on ' if fsync else 'off'} "
                        f"{r['events_per_s']:>9,} events/s ({r['seconds']} s; fsync set on "
                        f"{fsynced} of {tables} tables){'' if ok else ' NOT EXACT'}",
                        flush=True,
                    )
                    shutil.rmtree(work / group, ignore_errors=True)
                    small[fsync].append(_insert_ms(fsync, work / f"{group}-inserts"))
                    shutil.rmtree(work / f"{group}-inserts", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Each round's two runs ran back to back: their ratio is what the host's drift moves
    # least, so the median of those ratios is the figure, the medians of the rates beside.
    pairs = [b / a for a, b in zip(rates[False], rates[True], strict=True)]
    inserts = [b / a for a, b in zip(small[False], small[True], strict=True)]
    print(
        f"fsync: one small insert: median off {statistics.median(small[False]):.1f} ms, on "
        f"{statistics.median(small[True]):.1f} ms; on/off per round "
        f"{', '.join(f'{r:.2f}' for r in inserts)}, median {statistics.median(inserts):.2f}"
    )
    print(
        f"fsync: pipeline: median off {statistics.median(rates[False]):,.0f}, on "
        f"{statistics.median(rates[True]):,.0f} events/s; on/off per round "
        f"{', '.join(f'{r:.2f}' for r in pairs)}, median {statistics.median(pairs):.3f} "
        f"over {args.rounds} rounds; exact={exact}"
    )
    return 0 if exact else 1


def _same(got: object, truth: dict[str, str]) -> bool:
    """ClickHouse's totals (decimal strings as stored) equal the ground truth's."""
    assert isinstance(got, dict)
    return {k: Decimal(v) for k, v in got.items()} == {k: Decimal(v) for k, v in truth.items()}


if __name__ == "__main__":
    sys.exit(main())
