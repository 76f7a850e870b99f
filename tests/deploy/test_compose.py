"""docker-compose.yml, checked without a Docker engine: the Compose specification, every
USAGE_CONSUMER_* variable a real configuration field with a valid value, every consumer
command a real CLI command, pinned images, loopback-only ports, health checks and start
order, the files compose mounts, Prometheus and Alertmanager configuration by their own
tools, and the schema registration script against a stand-in registry."""

from __future__ import annotations

import argparse
import base64
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
import types
import typing
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from consumer.cli import COMMANDS, parser
from consumer.config import Settings, load_settings
from consumer.decode.schemas import SCHEMAS_DIR
from consumer.local.emulator.args import add_arguments as emulator_arguments

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PREFIX = "USAGE_CONSUMER_"
BIN = Path(sys.executable).parent
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def _load(path: Path = COMPOSE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())  # resolves the file's `<<:` merge keys
    assert isinstance(data, dict)
    return data


SPEC = _load()
SERVICES: dict[str, dict[str, Any]] = SPEC["services"]


def _tool(name: str) -> str | None:
    """A checker from the project's venv first, then PATH."""
    own = BIN / name
    return str(own) if own.exists() else shutil.which(name)


# --- Compose variable interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, $$ ---

_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|([A-Za-z_]\w*))")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        if m[1]:
            return "$"
        name = m[2] or m[5]
        if m[3] == ":-":
            return env.get(name) or m[4]
        if m[3] == "-":
            return env.get(name, m[4])
        return env.get(name, "")

    return _VAR.sub(one, value)


def environment(service: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """A service's environment as the container sees it (list or mapping form)."""
    raw = service.get("environment") or {}
    pairs = raw.items() if isinstance(raw, dict) else (item.split("=", 1) for item in raw)
    return {str(k): interpolate(str(v), env) for k, v in pairs}


def command(service: Mapping[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    words = shlex.split(cmd) if isinstance(cmd, str) else [str(w) for w in cmd]
    return [interpolate(w, {}) for w in words]


# The services that run the consumer's image: the one compose builds from ./Dockerfile.
CONSUMER_IMAGE = SERVICES["consumer"]["image"]
CONSUMER_SERVICES = {n: s for n, s in SERVICES.items() if s.get("image") == CONSUMER_IMAGE}
# Those that run `usage-consumer <command>` (no entrypoint of their own).
CLI_SERVICES = {n: s for n, s in CONSUMER_SERVICES.items() if "entrypoint" not in s}
ONE_SHOTS = {n for n, s in SERVICES.items() if s.get("restart") == "no"}


# --- Configuration fields from variable names -----------------------------------------


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner[0] if len(inner) == 1 else annotation
    return annotation


def config_path(name: str) -> str | None:
    """The configuration field `name` sets (pydantic-settings: prefix, `__` between levels,
    case-insensitive; a field with an alias is read under the alias), or None when it sets
    nothing. pydantic-settings itself ignores an unknown top-level name without a word."""
    first, *rest = name.lower().split("__")
    top = {}
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        env_name = alias.lower() if isinstance(alias, str) else PREFIX.lower() + field_name
        top[env_name] = (field_name, field.annotation)
    if first not in top:
        return None
    path, annotation = [top[first][0]], top[first][1]
    for segment in rest:
        model = _unwrap(annotation)
        if typing.get_origin(model) is dict:  # a free mapping (librdkafka, accounts): any key
            path.append(segment)
            annotation = typing.get_args(model)[1]
            continue
        if not (isinstance(model, type) and issubclass(model, pydantic.BaseModel)):
            return None  # a scalar or a list has no fields below it
        fields = {n.lower(): f for n, f in model.model_fields.items()}
        if segment not in fields:
            return None
        path.append(segment)
        annotation = fields[segment].annotation
    return ".".join(path)


def unknown_variables(spec: Mapping[str, Any]) -> list[str]:
    return sorted(
        f"{name}: {var}"
        for name, service in spec["services"].items()
        for var in environment(service, {})
        if var.upper().startswith(PREFIX) and config_path(var) is None
    )


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in list(os.environ):
        if var.upper().startswith(PREFIX):
            monkeypatch.delenv(var)
    return monkeypatch


def settings_of(service: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The consumer's settings in `service`, with compose's defaults for ${VAR:-...}."""
    for var, value in environment(SERVICES[service], {}).items():
        monkeypatch.setenv(var, value)
    return load_settings()


# --- The checks -----------------------------------------------------------------------


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    tool = _tool("check-jsonschema")
    if tool is None:
        pytest.skip("check-jsonschema is not installed (pip install check-jsonschema)")
    return subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_file_follows_the_compose_specification(tmp_path: Path) -> None:
    done = _check_jsonschema(COMPOSE)
    assert done.returncode == 0, done.stdout + done.stderr
    # The same check on a copy with a misspelt key fails: it reads what it validates.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("  read_only: true", "  read_olny: true", 1))
    done = _check_jsonschema(broken)
    assert done.returncode != 0 and "read_olny" in done.stdout


def test_every_usage_consumer_variable_is_a_configuration_field() -> None:
    assert unknown_variables(SPEC) == []
    seen = {v for s in SERVICES.values() for v in environment(s, {}) if v.startswith(PREFIX)}
    assert len(seen) >= 10  # the check looked at the consumer's environment, not nothing
    assert config_path("USAGE_CONSUMER_SCHEMA__REGISTRY_URL") == "schema_.registry_url"
    assert config_path("usage_consumer_kafka__librdkafka__socket.timeout.ms") is not None


def test_a_misspelt_variable_is_caught(tmp_path: Path) -> None:
    text = COMPOSE.read_text()
    wrong = {
        # one underscore: pydantic-settings would ignore it and connect to 127.0.0.1:9092
        "USAGE_CONSUMER_KAFKA__BOOTSTRAP_SERVERS:": "USAGE_CONSUMER_KAFKA_BOOTSTRAP_SERVERS:",
        "USAGE_CONSUMER_CLICKHOUSE__HOST:": "USAGE_CONSUMER_CLICKHOUSE__HOSTNAME:",
        "USAGE_CONSUMER_PIPELINE__METRICS_PORT:": "USAGE_CONSUMER_PIPELINE__METRICS_PORT__X:",
    }
    for right, typo in wrong.items():
        assert right in text
        text = text.replace(right, typo)
    copy = tmp_path / "docker-compose.yml"
    copy.write_text(text)
    found = {line.split(": ")[1] for line in unknown_variables(_load(copy))}
    assert found == {typo.rstrip(":") for typo in wrong.values()}


@pytest.mark.parametrize("service", sorted(CONSUMER_SERVICES))
def test_the_consumer_environment_is_a_valid_configuration(
    service: str, clean_env: pytest.MonkeyPatch
) -> None:
    s = settings_of(service, clean_env)
    assert s.clickhouse.backend == "server" and s.clickhouse.host in SERVICES
    assert s.kafka.bootstrap_servers.split(":")[0] in SERVICES
    assert s.schema_.registry_url is not None
    assert s.schema_.registry_url.split("//")[1].split(":")[0] in SERVICES
    # The Stripe key comes from the environment, with a test-mode default for the emulator.
    raw = SERVICES[service]["environment"]["USAGE_CONSUMER_STRIPE__API_KEY"]
    assert re.fullmatch(r"\$\{[A-Z_]+:-sk_test_\w+\}", raw), raw
    emulator = command(SERVICES["stripe-emulator"])
    port = emulator[emulator.index("--port") + 1]
    for base in (s.stripe.api_base, s.stripe.meter_events_base):
        assert base == f"http://stripe-emulator:{port}"


def test_probes_and_published_ports_are_the_ones_the_processes_listen_on(
    clean_env: pytest.MonkeyPatch,
) -> None:
    metrics = settings_of("consumer", clean_env).pipeline.metrics_port
    emulator = command(SERVICES["stripe-emulator"])
    listening = {
        "consumer": metrics,
        "stripe-emulator": int(emulator[emulator.index("--port") + 1]),
    }
    for name, port in listening.items():
        service = SERVICES[name]
        assert [str(p).rsplit(":", 1)[1] for p in service["ports"]] == [str(port)], name
        probe = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/" in probe, probe


def test_clickhouse_credentials_are_the_ones_the_server_is_given() -> None:
    for env in ({}, {"CLICKHOUSE_USER": "u", "CLICKHOUSE_PASSWORD": "p"}):
        server = environment(SERVICES["clickhouse"], env)
        client = environment(SERVICES["consumer"], env)
        assert client["USAGE_CONSUMER_CLICKHOUSE__USERNAME"] == server["CLICKHOUSE_USER"]
        assert client["USAGE_CONSUMER_CLICKHOUSE__PASSWORD"] == server["CLICKHOUSE_PASSWORD"]


@pytest.mark.parametrize("service", sorted(CLI_SERVICES))
def test_each_consumer_command_is_a_cli_command(service: str) -> None:
    argv = command(SERVICES[service])
    assert argv and argv[0] in COMMANDS, argv
    args, rest = parser().parse_known_args(argv)  # exits (fails the test) on a bad option
    if args.command == "stripe-emulator":
        own = argparse.ArgumentParser()
        emulator_arguments(own)
        own.parse_args(rest)
    else:
        assert rest == [], f"{service}: options `{' '.join(rest)}` are not {argv[0]}'s"


def test_the_services_that_run_the_consumer() -> None:
    """Built from ./Dockerfile, tagged with the package's version, read-only with /tmp."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    image = SERVICES["consumer"]["image"]
    assert image == f"usage-consumer:{version}"
    assert {"consumer", "migrate", "stripe-emulator", "meters-sync"} <= set(CLI_SERVICES)
    assert command(SERVICES["consumer"]) == ["run"]
    assert command(SERVICES["migrate"]) == ["migrate"]
    assert command(SERVICES["stripe-emulator"])[:3] == ["stripe-emulator", "--host", "0.0.0.0"]
    for name, service in CONSUMER_SERVICES.items():
        assert service.get("build") in (".", {"context": "."}), name
        assert service.get("read_only") is True, name
        assert "/tmp" in service.get("tmpfs", []), name


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_the_consumer_has_time_to_drain_on_stop() -> None:
    """Above the drain time the Helm chart budgets (values.yaml drainSeconds)."""
    values = yaml.safe_load((ROOT / "helm/usage-consumer/values.yaml").read_text())
    grace = _seconds(SERVICES["consumer"]["stop_grace_period"])
    assert grace > float(values["drainSeconds"])


def test_every_image_is_pinned() -> None:
    for name, service in SERVICES.items():
        image = service.get("image")
        assert image, f"{name}: no image"
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: {image} has no tag"
        assert re.match(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image} is not a release tag"


def test_images_are_the_ones_the_docker_tests_run() -> None:
    """The versions tests/integration's Docker-marked tests exercise the consumer against."""
    from tests.integration import conftest

    by_repo = {s["image"].rpartition(":")[0]: s["image"] for s in SERVICES.values()}
    for tested in (conftest.CLICKHOUSE_IMAGE, conftest.KAFKA_IMAGE):
        repo, _, tag = tested.rpartition(":")
        assert by_repo[repo].rpartition(":")[2].split(".")[: len(tag.split("."))] == tag.split(
            "."
        ), (by_repo[repo], tested)


def _host_ips(service: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    for port in service.get("ports", []):
        if isinstance(port, dict):
            yield str(port.get("host_ip", "")), str(port)
        else:
            parts = str(port).rsplit(":", 2)
            yield (parts[0] if len(parts) == 3 else ""), str(port)


def test_every_published_port_is_on_loopback() -> None:
    published = [(n, p, ip) for n, s in SERVICES.items() for ip, p in _host_ips(s)]
    assert len(published) >= 5
    assert [(n, p) for n, p, ip in published if ip != "127.0.0.1"] == []


def test_every_service_has_a_health_check_and_jobs_are_awaited() -> None:
    """A health check on every service that stays up; a one-shot job (restart "no") says
    it has none on purpose, and is a step another service waits to complete, or is started
    by hand (a profile)."""
    awaited = {
        dep
        for s in SERVICES.values()
        for dep, how in (s.get("depends_on") or {}).items()
        if how.get("condition") == "service_completed_successfully"
    }
    assert {"migrate", "kafka-init", "schema-init", "meters-sync", "doctor"} <= ONE_SHOTS
    for name, service in SERVICES.items():
        check = service.get("healthcheck")
        assert check, f"{name}: no healthcheck"
        if name in ONE_SHOTS:
            assert check == {"disable": True}, name
            assert name in awaited or service.get("profiles"), f"{name}: nothing waits for it"
            continue
        assert not check.get("disable") and check.get("test"), f"{name}: no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert check.get("interval") and check.get("retries"), name
        if name in CONSUMER_SERVICES:  # the image has no curl or wget: its Python asks
            assert check["test"][1] == "python", name


def test_depends_on_names_services_with_conditions_that_can_hold() -> None:
    for name, service in SERVICES.items():
        deps = service.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on without conditions"
        for dep, how in deps.items():
            assert dep in SERVICES and dep != name, f"{name} -> {dep}"
            condition = how.get("condition")
            assert condition in CONDITIONS, f"{name} -> {dep}: {condition}"
            if condition == "service_healthy":
                assert dep not in ONE_SHOTS, f"{name} -> {dep}: a job is never healthy"
            if condition == "service_completed_successfully":
                assert dep in ONE_SHOTS, f"{name} -> {dep}: never completes"
            assert not SERVICES[dep].get("profiles") or service.get("profiles"), (name, dep)
    # The consumer starts after every step it relies on.
    consumer = SERVICES["consumer"]["depends_on"]
    for step in ("migrate", "kafka-init", "schema-init", "meters-sync"):
        assert consumer[step]["condition"] == "service_completed_successfully", step
    for dep in ("kafka", "clickhouse"):
        assert consumer[dep]["condition"] == "service_healthy", dep


def test_the_consumer_starts_after_doctor_passes_every_step_before_it() -> None:
    """doctor (the preflight) runs once every step the consumer relies on is done, and
    the consumer waits for it: a FAIL stops the start; a WARN is let through."""
    consumer = SERVICES["consumer"]["depends_on"]
    doctor = SERVICES["doctor"]
    assert consumer["doctor"]["condition"] == "service_completed_successfully"
    assert {d: c for d, c in consumer.items() if d != "doctor"} == doctor["depends_on"]
    args, _ = parser().parse_known_args(command(doctor))
    assert args.command == "doctor" and args.fail_on == "fail"


def test_the_topics_created_are_the_consumers(clean_env: pytest.MonkeyPatch) -> None:
    kafka = settings_of("consumer", clean_env).kafka
    script = command(SERVICES["kafka-init"])[0]
    created = dict(re.findall(r"--topic (\S+) --partitions (\d+)", script))
    assert set(created) == {kafka.topic, kafka.dlq_topic, kafka.late_topic, kafka.control_topic}
    # The control topic as the consumer makes it (ingest/kafka.ensure_control_topic).
    control = re.search(rf"--topic {re.escape(str(kafka.control_topic))} (.*)", script)
    assert control and control[1].split() == [
        "--partitions", "1", "--config", "message.timestamp.type=LogAppendTime"
    ]  # fmt: skip
    assert "--if-not-exists" in script  # a restart of the stack finds them there
    # The sample is produced one partition each, so usage.events needs that many.
    load = command(SERVICES["demo-load"])
    assert load[0] == "produce" and load[load.index("--partitions") + 1] == created[kafka.topic]
    broker = SERVICES["kafka"]["environment"]
    assert broker["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    # KRaft's cluster id: a UUID, base64url without padding.
    assert len(base64.urlsafe_b64decode(broker["CLUSTER_ID"] + "==")) == 16


def _mounts(service: Mapping[str, Any]) -> Iterator[tuple[Path, str]]:
    """(repository path, container path) of each bind mount."""
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                yield ROOT / volume["source"], str(volume["target"])
        elif str(volume).startswith((".", "/")):
            source, target = str(volume).split(":")[:2]
            yield ROOT / source, target


def _parse(path: Path) -> None:
    text = path.read_text()
    if path.suffix in (".yml", ".yaml"):
        yaml.safe_load(text)
    elif path.suffix == ".json":
        json.loads(text)
    elif path.suffix == ".xml":
        ET.fromstring(text)
    elif path.suffix == ".py":
        compile(text, str(path), "exec")


def test_the_files_compose_mounts_exist_and_parse() -> None:
    mounts = [(n, src) for n, s in SERVICES.items() for src, _ in _mounts(s)]
    sources = {src.relative_to(ROOT).as_posix() for _, src in mounts}
    # The chart's rules and dashboard are mounted from the chart, not copied.
    assert {
        "helm/usage-consumer/files/prometheus-rules.yaml",
        "helm/usage-consumer/files/dashboard.json",
    } <= sources
    missing = [f"{n}: {src.relative_to(ROOT)}" for n, src in mounts if not src.exists()]
    assert missing == []
    for _, src in mounts:
        for path in [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file()):
            _parse(path)
        assert ROOT in src.resolve().parents, src  # nothing from outside the repository


def _prometheus_mounts() -> dict[str, Path]:
    return {target: src for src, target in _mounts(SERVICES["prometheus"])}


def test_prometheus_config_passes_promtool_and_loads_the_rules(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    mounts = _prometheus_mounts()
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    # rule_files name container paths: point each at the repository file mounted there.
    rewritten = []
    for pattern in config["rule_files"]:
        hits = [src for target, src in mounts.items() if fnmatch.fnmatch(target, pattern)]
        assert hits, f"rule_files {pattern} matches no mounted file: no alerts would load"
        rewritten += [str(src) for src in hits]
    config["rule_files"] = rewritten
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [promtool, "check", "config", str(copy)], capture_output=True, text=True, timeout=60
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert f"SUCCESS: {len(rewritten)} rule files found" in out
    assert re.search(r"SUCCESS: [1-9]\d* rules found", out), out


def test_prometheus_scrapes_the_consumer_and_alerts_through_alertmanager(
    clean_env: pytest.MonkeyPatch,
) -> None:
    config = yaml.safe_load(_prometheus_mounts()["/etc/prometheus/prometheus.yml"].read_text())
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    port = settings_of("consumer", clean_env).pipeline.metrics_port
    assert f"consumer:{port}" in targets
    for target in targets:
        host = target.rsplit(":", 1)[0]
        assert host == "localhost" or host in SERVICES, target
    (am,) = config["alerting"]["alertmanagers"]
    assert [t.split(":")[0] for sc in am["static_configs"] for t in sc["targets"]] == [
        "alertmanager"
    ]


def test_alertmanager_config_passes_amtool() -> None:
    amtool = _tool("amtool")
    if amtool is None:
        pytest.skip("amtool is not installed (Debian package prometheus-alertmanager)")
    (config,) = [s for s, t in _mounts(SERVICES["alertmanager"]) if t.endswith(".yml")]
    done = subprocess.run(
        [amtool, "check-config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard() -> None:
    mounts = {target: src for src, target in _mounts(SERVICES["grafana"])}
    provisioning = mounts["/etc/grafana/provisioning"]
    (sources,) = [yaml.safe_load(p.read_text()) for p in provisioning.glob("datasources/*.yaml")]
    (datasource,) = sources["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"].split("//")[1].split(":")[0] == "prometheus"
    (providers,) = [yaml.safe_load(p.read_text()) for p in provisioning.glob("dashboards/*.yaml")]
    (provider,) = providers["providers"]
    folder = provider["options"]["path"]
    dashboards = [src for target, src in mounts.items() if target.startswith(folder + "/")]
    assert [d.name for d in dashboards] == ["dashboard.json"]
    if not dashboards[0].exists():
        pytest.skip("helm/usage-consumer/files/dashboard.json is not there yet (see the mounts)")
    # Every data source a panel names is the provisioned one or a dashboard variable:
    # an exported `${DS_...}` input is not resolved by file provisioning.
    dashboard = json.loads(dashboards[0].read_text())
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    uids = set(_datasource_uids(dashboard))
    assert uids, "no panel names a data source"
    for uid in uids:
        if uid.startswith("$"):
            variable = variables.get(uid.strip("${}"), {})
            assert variable.get("type") == "datasource", f"{uid}: not a data source variable"
            assert variable.get("query") == datasource["type"], uid
        else:
            assert uid == datasource["uid"], f"{uid}: no such provisioned data source"


def _datasource_uids(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ds = node.get("datasource")
        if isinstance(ds, dict) and isinstance(ds.get("uid"), str):
            if ds.get("type") in (None, "prometheus"):
                yield ds["uid"]
        elif isinstance(ds, str) and ds:
            yield ds
        for key, value in node.items():
            if key != "datasource":
                yield from _datasource_uids(value)
    elif isinstance(node, list):
        for value in node:
            yield from _datasource_uids(value)


# --- compose/schema-registry/register.py against a stand-in registry -------------------


class _Registry(BaseHTTPRequestHandler):
    """What a Confluent registry does for the script: ids in order, one per new schema."""

    schemas: dict[int, str]
    posts: list[str]

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        sid = self.path.rsplit("/", 1)[1]
        if self.path == "/subjects":
            self._send(200, {})
        elif sid.isdigit() and int(sid) in self.schemas:
            self._send(200, {"schema": self.schemas[int(sid)]})
        else:
            self._send(404, {"error_code": 40403, "message": "Schema not found"})

    def do_POST(self) -> None:
        text = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["schema"]
        self.posts.append(self.path)
        known = [sid for sid, held in self.schemas.items() if held == text]
        sid = known[0] if known else max(self.schemas, default=0) + 1
        self.schemas[sid] = text
        self._send(200, {"id": sid})

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def registry() -> Iterator[tuple[str, type[_Registry]]]:
    handler = type("Registry", (_Registry,), {"schemas": {}, "posts": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", handler
    server.shutdown()
    server.server_close()


def _register(url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    service = SERVICES["schema-init"]
    (script,) = [s for s, t in _mounts(service) if t == service["entrypoint"][1]]
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(PREFIX)}
    env.update(environment(SERVICES["schema-init"], {}))
    env["USAGE_CONSUMER_SCHEMA__REGISTRY_URL"] = url
    return subprocess.run(
        [sys.executable, str(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_schema_init_registers_the_packaged_ids_once(
    registry: tuple[str, type[_Registry]], tmp_path: Path
) -> None:
    url, held = registry
    done = _register(url, tmp_path)
    assert done.returncode == 0, done.stderr
    id_map = json.loads((SCHEMAS_DIR / "registry.json").read_text())
    assert {sid: json.loads(text) for sid, text in held.schemas.items()} == {
        int(sid): json.loads((SCHEMAS_DIR / name).read_text()) for sid, name in id_map.items()
    }
    assert set(held.posts) == {"/subjects/usage.events-value/versions"}
    posted = len(held.posts)
    again = _register(url, tmp_path)  # a restart of the stack: nothing new
    assert again.returncode == 0 and len(held.posts) == posted, again.stderr


def test_schema_init_stops_when_an_id_holds_another_schema(
    registry: tuple[str, type[_Registry]], tmp_path: Path
) -> None:
    url, held = registry
    held.schemas[1] = json.dumps({"type": "record", "name": "Other", "fields": []})
    done = _register(url, tmp_path)
    assert done.returncode != 0
    assert "schema id 1 holds another schema" in done.stderr
