"""The import-linter contracts of `make lint` (pyproject.toml) hold, and break on a bad import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # this tree's `consumer`, not the installed one
    return subprocess.run(
        [str(LINT), "--no-logo", "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "consumer", tree / "consumer", ignore=shutil.ignore_patterns("*.so"))
    (tree / "tests").mkdir()
    (tree / "tests" / "__init__.py").write_text("")
    (tree / "tests" / "support.py").write_text("")
    shutil.copy(ROOT / "pyproject.toml", tree)
    return tree


def _add_import(module: Path, line: str) -> None:
    text = module.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    assert sep, module
    module.write_text(head + sep + line + "\n" + rest)


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    done = _lint(_copy(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # a stage importing one above it
        ("store/backend.py", "import consumer.sinks.ledger", "imports only the parts below it"),
        # the run path importing test support
        ("ingest/loop.py", "import tests.support", "never imports the local stand-ins"),
        # a cycle inside a package (fast.py imports event.py)
        ("decode/event.py", "import consumer.decode.fast", "No import cycles"),
    ],
)
def test_a_bad_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    tree = _copy(tmp_path)
    _add_import(tree / "consumer" / module, line)
    done = _lint(tree)
    assert done.returncode != 0
    assert any(broken in x and x.endswith("BROKEN") for x in done.stdout.splitlines()), done.stdout


def test_run_loads_no_local_stand_in() -> None:
    # cli.py imports consumer.local only inside the demo and emulator commands.
    code = (
        "import sys\n"
        "from consumer import cli\n"
        "args, _ = cli.parser().parse_known_args(['run'])\n"
        "import consumer.app\n"
        "print(sorted(m for m in sys.modules if m.startswith(('consumer.local', 'tests'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
