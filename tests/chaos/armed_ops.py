"""`usage-consumer <command>` with the crash harness's hooks armed (tests/support/armed.py):
the repair scenario SIGKILLs `replay` and `reconcile --repair` at named points this way.

    USAGE_CONSUMER_FAULT=after_repair_pushes:1 \
        python -m tests.chaos.armed_ops --config c.yaml reconcile --repair
"""

from __future__ import annotations

import sys

from consumer.cli import main
from tests.support.armed import arm

if __name__ == "__main__":
    arm()
    sys.exit(main(sys.argv[1:]))
