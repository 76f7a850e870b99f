"""Deterministic kill points for the crash harness.

Enabled only by USAGE_CONSUMER_FAULT="<point>:<n>[,<point>:<n>...]": the process SIGKILLs
itself at the n-th time it reaches <point>. Unset (production), a call costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import sys

_ARMED: dict[str, int] = {}
_SEEN: dict[str, int] = {}


def _arm(spec: str) -> None:
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, n = item.partition(":")
        _ARMED[point] = int(n or "1")


_arm(os.environ.get("USAGE_CONSUMER_FAULT", ""))


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL on the armed occurrence of `name`."""
    if name not in _ARMED:
        return
    _SEEN[name] = _SEEN.get(name, 0) + 1
    if _SEEN[name] == _ARMED[name]:
        sys.stderr.write(f"fault: SIGKILL at {name} #{_SEEN[name]}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
