"""Runs a command again and again while every core is busy with a CPU hog, and counts passes.

    python -m tests.stress --runs 20 -- pytest -q tests/integration/test_rebalance.py
    python -m tests.stress --runs 3 --keep-going -- make test

The hog is one busy-looping process per core (`--hogs`, default the core count), started
before the first run and killed after the last, so every run meets the same contention a
loaded CI host or a busy laptop gives it: threads are descheduled for tens of milliseconds,
timeouts fire late and polls return empty. A test that relies on timing fails here first.
Each run's last output line (pytest's summary) is printed with its exit code; the command
exits 0 only when every run passed. Stops at the first failure unless `--keep-going`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence


def _burn() -> None:  # pragma: no cover - runs in the hog processes
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF


def start_hogs(n: int) -> list[multiprocessing.Process]:
    hogs = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(n)]
    for h in hogs:
        h.start()
    return hogs


def stop_hogs(hogs: Sequence[multiprocessing.Process]) -> None:
    for h in hogs:
        h.kill()
    for h in hogs:
        h.join()


def _summary(text: str) -> str:
    """pytest's closing line (the last naming passed, failed or error), else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^=*\s*\d+ (passed|failed|errors?)\b.* in [\d.]+s", ln):
            return ln
    return lines[-1] if lines else ""


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.stress", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--hogs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--keep-going", action="store_true", help="run every run, even after a fail")
    ap.add_argument("--log", default="", help="append every run's full output to this file")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    command = [c for c in args.command if c != "--"] if args.command else []
    if not command:
        ap.error("a command to run is required after --")
    hogs = start_hogs(args.hogs)
    print(f"stress: {args.hogs} CPU hog processes; {args.runs} runs of: {' '.join(command)}")
    passed = 0
    try:
        for i in range(1, args.runs + 1):
            t0 = time.monotonic()
            proc = subprocess.run(command, capture_output=True, text=True, check=False)
            out = proc.stdout + proc.stderr
            if args.log:
                with open(args.log, "a") as f:
                    f.write(f"\n===== run {i} exit {proc.returncode} =====\n{out}")
            ok = proc.returncode == 0
            passed += ok
            verdict = "pass" if ok else "FAIL"
            took = time.monotonic() - t0
            print(f"stress: run {i}/{args.runs} {verdict} in {took:.0f} s: {_summary(out)}")
            sys.stdout.flush()
            if not ok:
                print(out[-6000:])
                if not args.keep_going:
                    break
    finally:
        stop_hogs(hogs)
    print(f"stress: {passed}/{args.runs} passed: {' '.join(command)}")
    return 0 if passed == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
