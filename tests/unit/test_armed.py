import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.armed import parse_points

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (
    "from consumer import crash_points\n"
    "from tests.support.armed import arm\n"
    "arm()\n"
    "for i in range(3):\n"
    "    crash_points.reached('a'); crash_points.reached('b')\n"
    "    crash_points.classifying([b'ok', None]); print('passed', i, flush=True)\n"
    "crash_points.classifying([b'x-POISON-x'])\n"
    "print('after poison', flush=True)\n"
)


def run(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_armed_point_kills_on_its_nth_occurrence() -> None:
    out = run(USAGE_CONSUMER_FAULT="b:2")
    assert out.returncode == -signal.SIGKILL
    assert out.stdout.split("\n")[:1] == ["passed 0"] and "passed 1" not in out.stdout
    assert "fault: SIGKILL at b #2" in out.stderr


def test_poison_kills_when_its_message_is_classified() -> None:
    out = run(USAGE_CONSUMER_POISON="POISON")
    assert out.returncode == -signal.SIGKILL
    assert out.stdout.count("passed") == 3 and "after poison" not in out.stdout
    assert "fault: SIGKILL at poison message" in out.stderr


def test_unarmed_points_do_nothing() -> None:
    out = run(USAGE_CONSUMER_FAULT="", USAGE_CONSUMER_POISON="")
    assert out.returncode == 0 and out.stdout.count("passed") == 3
    assert "after poison" in out.stdout


def test_the_production_code_reads_no_fault_switch() -> None:
    switches = ["USAGE_CONSUMER_FAULT", "USAGE_CONSUMER_POISON", "USAGE_CONSUMER_STORE_FAULTS"]
    switches.append("USAGE_CONSUMER_CLOCK_SKEW")
    for path in (ROOT / "consumer").rglob("*.py"):
        text = path.read_text()
        assert not [s for s in switches if s in text], path


def test_point_specs() -> None:
    assert parse_points("a:2, b,") == {"a": 2, "b": 1}
    assert parse_points("") == {}
