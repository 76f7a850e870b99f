import os
import signal
import subprocess
import sys

SCRIPT = (
    "from consumer.faults import fault_point\n"
    "for i in range(3):\n"
    "    fault_point('a'); fault_point('b'); print('passed', i, flush=True)\n"
)


def run(spec: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "USAGE_CONSUMER_FAULT": spec}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=30
    )


def test_armed_point_kills_on_its_nth_occurrence() -> None:
    out = run("b:2")
    assert out.returncode == -signal.SIGKILL
    assert out.stdout.split("\n")[:1] == ["passed 0"] and "passed 1" not in out.stdout
    assert "fault: SIGKILL at b #2" in out.stderr


def test_unarmed_points_do_nothing() -> None:
    out = run("")
    assert out.returncode == 0 and out.stdout.count("passed") == 3
