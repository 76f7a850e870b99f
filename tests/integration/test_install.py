"""The package as users get it: a wheel built the way `pip install .` builds it, installed
non-editable into a clean venv, runs `usage-consumer --help` and decodes a message of every
schema version from its packaged schemas; built where the C compiler fails, it still
installs and decodes, on fastavro alone, and says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "tests" / "support" / "installed_check.py"


def _run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    done = subprocess.run(
        cmd,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _source(tmp: Path) -> Path:
    """The tree a fresh clone has: no built extension, no caches."""
    src = tmp / "src"
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "consumer", src / "consumer", ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src)
    return src


def _wheel(src: Path, out: Path, env: dict[str, str]) -> tuple[Path, str]:
    log = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-cache-dir",
            "--no-deps",
            "-w",
            str(out),
            str(src),
        ],
        env,
    )
    (wheel,) = out.glob("usage_consumer-*.whl")
    return wheel, log


def _venv(where: Path) -> Path:
    _run([sys.executable, "-m", "venv", str(where)])
    return where / "bin"


def _site_packages(bin_dir: Path) -> Path:
    out = _run(
        [str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    )
    return Path(out.strip().splitlines()[-1])


def _check(bin_dir: Path, *args: str) -> tuple[dict[str, Any], str]:
    done = subprocess.run(
        [str(bin_dir / "python"), str(CHECK), *args],
        cwd=bin_dir.parent,  # not the checkout: its `consumer` must not shadow the installed one
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two clean venvs: the wheel with the C decoder (dependencies from the index), and the
    wheel built with a compiler that fails (the first venv's dependencies borrowed)."""
    tmp = tmp_path_factory.mktemp("install")
    src = _source(tmp)
    with_c, _ = _wheel(src, tmp / "with-c", {})
    without_c, log = _wheel(_source(tmp / "again"), tmp / "without-c", {"CC": "false"})
    assert "consumer.decode._avrofast" in log  # the optional build was tried and failed
    full = _venv(tmp / "venv")
    _run([str(full / "pip"), "install", "--quiet", str(with_c)])
    bare = _venv(tmp / "venv-no-c")
    _run([str(bare / "pip"), "install", "--quiet", "--no-deps", str(without_c)])
    (_site_packages(bare) / "borrowed.pth").write_text(f"{_site_packages(full)}\n")
    return {"full": full, "bare": bare}


def _decodes_every_version(report: dict[str, Any], venv: Path, fast_rows: bool) -> None:
    assert report["module"].startswith(str(venv.parent)), report["module"]  # not the checkout
    assert report["schema_ids"] == [1, 2, 3, 4]
    # every migration module of the tree made it into the package
    assert report["migrations"] == sorted(
        int(p.name[1:3]) for p in (ROOT / "consumer/store/migrations").glob("m[0-9][0-9]_*.py")
    )
    assert len(report["versions"]) == 4
    for name, v in report["versions"].items():
        assert v["event_id"] == "evt-1" and v["value"] == "1.500000000", name
        assert v["timestamp_ms"] == 1767323045678, name
        assert v["properties"] == ({} if name.endswith(".v1.avsc") else {"region": "eu"}), name
        assert v["fast_row"] is fast_rows, name
        if fast_rows:
            assert v["fast_event_id"] == "evt-1", name


def test_the_wheel_runs_its_cli_and_decodes_every_schema_version(
    installed: dict[str, Path],
) -> None:
    venv = installed["full"]
    assert "usage-consumer" in _run([str(venv / "usage-consumer"), "--help"])
    report, log = _check(venv)
    assert report["fast"] is True and report["unavailable"] == ""
    assert "decoder: the C fast path" in log
    _decodes_every_version(report, venv, fast_rows=True)


def test_the_fast_path_switched_off_decodes_every_version_on_fastavro(
    installed: dict[str, Path],
) -> None:
    report, log = _check(installed["full"], "--no-fast")
    assert report["fast"] is False
    assert "schema.fast_decoder is false" in log
    _decodes_every_version(report, installed["full"], fast_rows=False)


def test_built_without_a_compiler_it_installs_and_decodes_on_fastavro(
    installed: dict[str, Path],
) -> None:
    venv = installed["bare"]
    assert not [
        p for p in (_site_packages(venv) / "consumer" / "decode").iterdir() if p.suffix == ".so"
    ]
    assert "usage-consumer" in _run([str(venv / "usage-consumer"), "--help"])
    report, log = _check(venv)
    assert report["fast"] is False and "not built" in report["unavailable"]
    assert "decoder: fastavro only, several times slower" in log
    _decodes_every_version(report, venv, fast_rows=False)
