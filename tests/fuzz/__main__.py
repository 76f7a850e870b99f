"""`python -m tests.fuzz decoder|run`: the decoder's differential fuzz (tests/fuzz/avrofast.py)
or the run-path fuzz (tests/fuzz/run.py). The seed is printed; pass it back to replay."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tests.fuzz import avrofast


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    dec = sub.add_parser("decoder", help="the C decoder against the reference, in process")
    dec.add_argument("--seconds", type=float, default=60.0)
    dec.add_argument("--seed", type=int, default=int(time.time()))
    dec.add_argument("--asan", action="store_true", help="rebuild with sanitizers first")
    run = sub.add_parser("run", help="messages through Tansu into `usage-consumer run`")
    run.add_argument("--messages", type=int, default=100_000)
    run.add_argument("--seed", type=int, default=int(time.time()))
    run.add_argument("--partitions", type=int, default=3)
    run.add_argument("--timeout", type=float, default=900.0, help="seconds to drain")
    run.add_argument("--now-ms", type=int, help="the record time to replay (default: this hour)")
    run.add_argument("--batch", type=int, default=0, help="batch_max_messages (default: seeded)")
    run.add_argument("--decoder", choices=["fast", "reference"], help="default: seeded")
    run.add_argument("--workdir", type=Path, help="keeps the store and the consumer's log")
    args = parser.parse_args(argv)
    if args.what == "decoder":
        return avrofast.main(
            ["--seconds", str(args.seconds), "--seed", str(args.seed)]
            + (["--asan"] if args.asan else [])
        )
    from tests.fuzz.run import run as run_fuzz

    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        workdir = args.workdir or Path(tmp)
        report = run_fuzz(
            args.messages,
            args.seed,
            workdir,
            args.partitions,
            args.timeout,
            args.now_ms,
            args.batch,
            None if args.decoder is None else args.decoder == "fast",
        )
        for line in report.lines():
            print(line, flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
