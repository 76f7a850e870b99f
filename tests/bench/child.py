"""One benchmark round in a process of its own: a fresh interpreter, so no round inherits
another's caches, threads or store handle."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def run_child(
    code: str,
    args: list[object],
    marker: str,
    env: Mapping[str, str],
    what: str,
    cwd: Path | None = None,
) -> dict[str, object]:
    """Run `code` with `args` as JSON in argv[1]; its result is the JSON after `marker ` on
    a line of its stdout. No such line: RuntimeError with the ends of both streams."""
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(marker + " "):
            result: dict[str, object] = json.loads(line[len(marker) + 1 :])
            return result
    raise RuntimeError(f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
