"""The consumer as the crash harness runs it: `usage-consumer run` with its faults armed.

    python -m tests.support.armed                  # run
    python -m tests.support.armed dlq redrive ...  # another command, its points armed

Arms, from the harness's environment (the production `run` reads none of these):
USAGE_CONSUMER_FAULT="<point>:<n>[,...]" SIGKILLs the process the n-th time the write
sequence reaches <point> (`consumer/crash_points.py`); USAGE_CONSUMER_POISON="<text>"
SIGKILLs it whenever a message holding <text> is classified, a poison message that crashes
every attempt (P7); USAGE_CONSUMER_POISON_HEADERS="<text>" does so when the C decoder is
about to parse such a message's header; USAGE_CONSUMER_POISON_PUSH="<identifier>" SIGKILLs
it whenever that Stripe push is about to be sent, a push that crashes the emitter
(unanswered.py); USAGE_CONSUMER_STORE_FAULTS="rate=..,timeout=..,seed=.." faults the
store (`faulty_store.py`); USAGE_CONSUMER_CLOCK_SKEW_SECONDS shifts the wall clock, a host
clock jump.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from consumer import crash_points
from consumer.cli import main as cli_main
from consumer.cli import serve
from consumer.clock import SystemClock
from consumer.config import ClickHouseConfig, load_settings
from consumer.store import Backend, open_store
from tests.support.faulty_store import from_spec


def parse_points(spec: str) -> dict[str, int]:
    """ "a:2,b" -> {"a": 2, "b": 1}: each point and the occurrence that kills."""
    armed: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, n = item.partition(":")
        armed[point] = int(n or "1")
    return armed


def die(what: str) -> None:
    sys.stderr.write(f"fault: SIGKILL at {what}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at(armed: Mapping[str, int]) -> crash_points.PointHook:
    seen: dict[str, int] = {}

    def point(name: str) -> None:
        if name in armed:
            seen[name] = seen.get(name, 0) + 1
            if seen[name] == armed[name]:
                die(f"{name} #{seen[name]}")

    return point


def kill_sending(identifier: str) -> crash_points.PushesHook:
    def pushes(identifiers: Iterable[str]) -> None:
        if identifier in identifiers:
            die(f"poison push {identifier}")

    return pushes


def kill_on(poison: bytes, what: str = "poison message") -> crash_points.MessagesHook:
    def messages(values: Iterable[bytes | None]) -> None:
        if any(v is not None and poison in v for v in values):
            die(what)

    return messages


@dataclass(frozen=True)
class Armed:
    clock: SystemClock
    store_faults: str

    def open_store(self, cfg: ClickHouseConfig) -> Backend:
        return from_spec(open_store(cfg), self.store_faults)


def arm(env: Mapping[str, str] = os.environ) -> Armed:
    """Install this process's crash hooks; the skewed clock and store faults to inject."""
    poison = env.get("USAGE_CONSUMER_POISON", "").encode()
    push = env.get("USAGE_CONSUMER_POISON_PUSH", "")
    in_headers = env.get("USAGE_CONSUMER_POISON_HEADERS", "").encode()
    crash_points.install(
        kill_at(parse_points(env.get("USAGE_CONSUMER_FAULT", ""))),
        kill_on(poison) if poison else None,
        kill_sending(push) if push else None,
        kill_on(in_headers, "poison message's header") if in_headers else None,
    )
    skew = float(env.get("USAGE_CONSUMER_CLOCK_SKEW_SECONDS", "") or 0)
    return Armed(SystemClock(skew), env.get("USAGE_CONSUMER_STORE_FAULTS", ""))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    armed = arm()
    if argv:  # a command other than run (`dlq redrive`), killed at its own points
        return cli_main(argv)
    settings = load_settings()
    store = armed.open_store(settings.clickhouse)
    try:
        return serve(settings, armed.clock, store)
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
