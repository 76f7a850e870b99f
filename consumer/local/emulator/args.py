"""The emulator's command-line options, shared by `usage-consumer stripe-emulator` and
`python -m consumer.local.emulator`."""

from __future__ import annotations

import argparse

from consumer.local.emulator.options import EmulatorOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    parser.add_argument(
        "--token-lifetime",
        type=float,
        default=900.0,
        help="meter event session lifetime in seconds",
    )
    parser.add_argument("--rate-429", type=float, default=0.0, help="share of 429 answers")
    parser.add_argument("--rate-5xx", type=float, default=0.0, help="share of 500 answers")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before answering")
    parser.add_argument(
        "--reset-rate",
        type=float,
        default=0.0,
        help="share of stream calls reset unanswered after their events were stored",
    )
    parser.add_argument(
        "--duplicate-answer",
        choices=("drop", "reject_event", "reject_request"),
        default="drop",
        help="how a duplicate identifier is answered",
    )
    parser.add_argument(
        "--duplicate-names",
        choices=("all", "first", "none"),
        default="all",
        help="how many duplicate identifiers a duplicate 400 names",
    )
    parser.add_argument(
        "--idempotency",
        choices=("on", "off"),
        default="on",
        help="answer a repeated Idempotency-Key of a successful request from a cache",
    )
    parser.add_argument(
        "--unknown-customers",
        default="",
        help="comma-separated customer ids whose events are rejected after a 200",
    )
    parser.add_argument(
        "--whole-values-only", action="store_true", help="refuse values with a fraction"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-requests", action="store_true", help="one line per request")


def to_options(args: argparse.Namespace) -> EmulatorOptions:
    return EmulatorOptions(
        token_lifetime_seconds=args.token_lifetime,
        rate_429=args.rate_429,
        rate_5xx=args.rate_5xx,
        latency_seconds=args.latency,
        reset_rate=args.reset_rate,
        duplicate_answer=args.duplicate_answer,
        duplicate_names=args.duplicate_names,
        idempotency=args.idempotency == "on",
        unknown_customers=args.unknown_customers,
        whole_values_only=args.whole_values_only,
        seed=args.seed,
        verbose=args.log_requests,
    )
