"""Deterministic kill points for the crash harness.

Enabled only by USAGE_CONSUMER_FAULT="<point>:<n>[,<point>:<n>...]": the process SIGKILLs
itself at the n-th time it reaches <point>. Unset (production), a call costs one dict lookup.

USAGE_CONSUMER_POISON="<text>" makes every message whose bytes contain <text> kill the
process whenever it is classified: a poison message that crashes every attempt (P7).
USAGE_CONSUMER_CLOCK_SKEW_SECONDS shifts the `run` process's wall clock: a host clock jump.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable

_ARMED: dict[str, int] = {}
_SEEN: dict[str, int] = {}


def _arm(spec: str) -> None:
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, n = item.partition(":")
        _ARMED[point] = int(n or "1")


_arm(os.environ.get("USAGE_CONSUMER_FAULT", ""))
_POISON = os.environ.get("USAGE_CONSUMER_POISON", "").encode() or None


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL on the armed occurrence of `name`."""
    if name not in _ARMED:
        return
    _SEEN[name] = _SEEN.get(name, 0) + 1
    if _SEEN[name] == _ARMED[name]:
        _die(f"{name} #{_SEEN[name]}")


def poison_check(values: Iterable[bytes | None]) -> None:
    """Kill this process if any value carries the armed poison marker (one check unarmed)."""
    if _POISON is None:
        return
    if any(v is not None and _POISON in v for v in values):
        _die("poison message")


def _die(what: str) -> None:
    sys.stderr.write(f"fault: SIGKILL at {what}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def clock_skew_seconds() -> float:
    """The armed wall-clock skew of this process (0 unless the harness sets one)."""
    return float(os.environ.get("USAGE_CONSUMER_CLOCK_SKEW_SECONDS", "") or 0)
