"""The import-linter contracts of `make lint` (pyproject.toml) hold, and break on a bad import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_a_stage_importing_one_above_it_breaks_the_layers(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    _add_import(tree / "consumer" / "store" / "backend.py", "import consumer.sinks.ledger")
    done = _lint(tree)
    assert done.returncode != 0
    assert "imports only the parts below it BROKEN" in done.stdout, done.stdout


def test_the_run_path_importing_test_support_breaks_a_contract(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    _add_import(tree / "consumer" / "ingest" / "loop.py", "import tests.support")
    done = _lint(tree)
    assert done.returncode != 0
    assert "never imports the local stand-ins or test support BROKEN" in done.stdout, done.stdout


def test_a_cycle_inside_a_package_breaks_a_contract(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    _add_import(tree / "consumer" / "decode" / "event.py", "import consumer.decode.fast")
    done = _lint(tree)
    assert done.returncode != 0
    assert "No import cycles" in done.stdout and "BROKEN" in done.stdout, done.stdout


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
