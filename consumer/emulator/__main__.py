"""``python -m consumer.emulator --port 12111``: run the emulator until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse

from consumer.emulator.options import EmulatorOptions
from consumer.emulator.server import main


def _parse(argv: list[str] | None = None) -> tuple[str, int, EmulatorOptions]:
    parser = argparse.ArgumentParser(prog="python -m consumer.emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument("--rate-429", type=float, default=0.0)
    parser.add_argument("--rate-5xx", type=float, default=0.0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument(
        "--duplicate-answer", choices=("drop", "reject_event", "reject_request"), default="drop"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    options = EmulatorOptions(
        rate_429=args.rate_429,
        rate_5xx=args.rate_5xx,
        latency_seconds=args.latency,
        duplicate_answer=args.duplicate_answer,
        seed=args.seed,
        verbose=args.verbose,
    )
    return args.host, args.port, options


if __name__ == "__main__":
    main(*_parse())
