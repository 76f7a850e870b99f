"""`make test`'s pytest run as two shards side by side, so the suite fits its time budget.

    python -m tests.shards [pytest args...]

Most of the suite waits: on a broker's session timeout, a killed process's restart, a
lease changing hands. One process leaves a core idle through those waits; two shards fill
it. Shard `chaos` holds the crash harness's CI matrix (the one long test, minutes of
kills and restarts) and the other long multi-process tests listed in SLOW; shard `rest` is
everything else. Each shard is a whole pytest run with its own temporary directories and
ports, so they share nothing. `rest` streams to the terminal; `chaos` is written to a file
and printed when it ends, so no line interleaves. The exit code is the worse of the two,
and each shard's seed lines and slowest-tests table are in its own output.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# The long multi-process tests that go beside the chaos matrix (balanced by the durations
# table `make test` prints: the shard holding the chaos run should end near the other).
SLOW = [
    "tests/integration/test_chaos.py",
    "tests/integration/test_push_quarantine.py",
    "tests/integration/test_emitter_failover.py",
    "tests/integration/test_migrations.py",
    "tests/integration/test_zombie.py",
]


def main(argv: Sequence[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    pytest = [sys.executable, "-m", "pytest"]
    deselect = [arg for path in SLOW for arg in ("--ignore", path)]
    with tempfile.TemporaryFile(mode="w+") as side:
        chaos = subprocess.Popen([*pytest, *extra, *SLOW], stdout=side, stderr=subprocess.STDOUT)
        try:
            rest = subprocess.call([*pytest, *extra, *deselect])
        finally:
            chaos_rc = chaos.wait()
        side.seek(0)
        print(f"\n===== shard chaos ({' '.join(Path(p).name for p in SLOW)}) =====")
        sys.stdout.write(side.read())
    print(f"shards: rest exit {rest}, chaos exit {chaos_rc}")
    return rest or chaos_rc


if __name__ == "__main__":
    sys.exit(main())
