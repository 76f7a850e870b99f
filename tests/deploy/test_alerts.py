"""The alert rules and the Grafana dashboard, checked by promtool and against a live /metrics.

promtool comes with Debian's `prometheus` package (`.ci/run` installs it); without it the
promtool checks skip with the reason, and the checks that need only Python still run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.clock import SystemClock
from consumer.metrics import Metrics
from consumer.ops.health import Health, serve

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "helm" / "usage-consumer" / "files" / "prometheus-rules.yaml"
DASHBOARD = ROOT / "helm" / "usage-consumer" / "files" / "dashboard.json"
UNIT_TESTS = sorted((ROOT / "tests" / "deploy" / "rules").glob("*.yaml"))
OPERATIONS = ROOT / "docs" / "operations.md"
RUNBOOK_SECTION = "## Alerts and what to do"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="needs promtool (Debian package `prometheus`; .ci/run installs it)",
)

# Series Prometheus makes itself, not the consumer.
PROMETHEUS_OWN = {"up", "ALERTS", "ALERTS_FOR_STATE"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_GROUPING = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
# Grafana's macros, given values a rule may hold: promtool parses the rest as Prometheus does.
_GRAFANA_MACROS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$__range_s": "3600",
    "$__range_ms": "3600000",
    "$__interval_ms": "60000",
}
_TEMPLATE_VARIABLES = {"$job": ".*", "${job}": ".*"}


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in load_rules() if "alert" in rule]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold theirs


def dashboard_exprs() -> dict[str, str]:
    """Every query of the dashboard, keyed by panel and target."""
    return {
        f"{panel['title']} [{target['refId']}]": target["expr"]
        for panel in panels(dashboard())
        for target in panel.get("targets", [])
    }


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects: identifiers left once strings, label
    matchers, ranges, grouping clauses and offsets are gone, less functions and keywords."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(_GROUPING, "", e)
    e = re.sub(r"\boffset\s+\S+", "", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end() :].lstrip().startswith("("):
            continue  # a function
        if m.group().lower() not in _KEYWORDS:
            names.add(m.group())
    return names


def exposed_names(text: str) -> set[str]:
    """Every series name a scrape of `text` can yield, also for labelled metrics that have
    no child yet (exposed as HELP and TYPE lines only)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "counter":
                base = name.removesuffix("_total")
                names |= {base + "_total", base + "_created"}
            elif kind in ("histogram", "summary"):
                names |= {name + s for s in ("_count", "_sum", "_created")}
                names |= {name + "_bucket"} if kind == "histogram" else {name}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def runbook_headings() -> list[str]:
    """The headings inside the runbook section of docs/operations.md."""
    text = OPERATIONS.read_text()
    assert RUNBOOK_SECTION in text, f"docs/operations.md lacks {RUNBOOK_SECTION!r}"
    section = text.split(RUNBOOK_SECTION, 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("### ")]


@pytest.fixture(scope="module")
def live_metrics() -> Iterator[str]:
    """/metrics of the real endpoint `usage-consumer run` serves."""
    server, port = serve("127.0.0.1", 0, Metrics(), Health(SystemClock()))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            yield r.read().decode()
    finally:
        server.shutdown()
        server.server_close()


# -- the rules ----------------------------------------------------------------------------


@needs_promtool
def test_rules_pass_promtool_check() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in done.stdout


@needs_promtool
@pytest.mark.parametrize("unit_test", UNIT_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests_pass(unit_test: Path) -> None:
    done = promtool("test", "rules", str(unit_test))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_fires_and_stays_silent_in_the_unit_tests() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for path in UNIT_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../../../helm/usage-consumer/files/prometheus-rules.yaml"]
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - fires == set(), "alerts no unit test makes fire"
    assert names - silent == set(), "alerts no unit test shows silent on healthy series"
    assert (fires | silent) - names == set(), "unit tests of alerts that do not exist"


def test_alerts_follow_the_conventions() -> None:
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)), "duplicate alert names"
    anchors = {github_anchor(h) for h in runbook_headings()}
    for a in alerts():
        name = a["alert"]
        assert re.fullmatch(r"UsageConsumer(?:[A-Z][a-z0-9]*)+", name), name
        assert a["labels"]["severity"] in ("page", "ticket"), name
        notes = a["annotations"]
        assert notes["summary"].strip() and notes["description"].strip(), name
        url = notes["runbook_url"]
        assert url == f"docs/operations.md#{github_anchor(name)}", (name, url)
        assert url.split("#", 1)[1] in anchors, f"{name}: no runbook entry {url}"
    assert anchors == {github_anchor(n) for n in names}, "runbook entries without an alert"


# -- metric names: what the rules and the dashboard read must exist -----------------------


def test_metric_names_reads_what_a_query_selects() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, table) (rate(a_seconds_bucket{x="y(z)"}[5m])))'
        " / ignoring (le) b_total offset 1h > 1e3 and on (instance) c unless d{e=~'f'} == bool 2"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c", "d"}


def test_rules_and_dashboard_read_only_metrics_the_consumer_exposes(live_metrics: str) -> None:
    exposed = exposed_names(live_metrics) | PROMETHEUS_OWN
    assert "usage_consumer_clickhouse_insert_seconds_bucket" in exposed
    used = {f"rule {a['alert']}": metric_names(a["expr"]) for a in alerts()}
    used |= {f"panel {k}": metric_names(v) for k, v in dashboard_exprs().items()}
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            used[f"variable {var['name']}"] = set(
                re.findall(r"label_values\((\w+)", var["definition"])
            )
    missing = {where: sorted(names - exposed) for where, names in used.items() if names - exposed}
    assert missing == {}
    assert all(used.values()), "a query that selects no metric"


@needs_promtool
def test_live_metrics_pass_promtool_check_metrics(live_metrics: str) -> None:
    done = promtool("check", "metrics", stdin=live_metrics)
    assert done.returncode == 0, done.stdout + done.stderr


# -- the dashboard ------------------------------------------------------------------------


@needs_promtool
def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """Each query becomes a recording rule: `promtool check rules` parses it as Prometheus
    would, once Grafana's macros and variables hold values."""
    rules = []
    for i, (where, expr) in enumerate(sorted(dashboard_exprs().items())):
        for macro in sorted(_GRAFANA_MACROS, key=len, reverse=True):
            expr = expr.replace(macro, _GRAFANA_MACROS[macro])
        for var, value in _TEMPLATE_VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{where}: an unknown macro or variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_dashboard_is_provisionable_and_covers_the_pipeline() -> None:
    board = dashboard()
    assert board["uid"] == "usage-consumer"  # links and provisioning rely on it
    assert board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert 'job=~"$job"' in target["expr"], (panel["title"], target["expr"])
    exprs = "\n".join(dashboard_exprs().values())
    for needed in (
        "rate(usage_consumer_events_consumed_total",
        "rate(usage_consumer_events_accepted_total",
        "rate(usage_consumer_events_duplicate_total",
        "rate(usage_consumer_events_late_total",
        "rate(usage_consumer_events_invalid_total",
        "usage_consumer_consumer_lag_messages",
        "histogram_quantile(0.99, sum by (le, table) "
        "(rate(usage_consumer_clickhouse_insert_seconds_bucket",
        "usage_consumer_rollup_jobs_waiting",
        "rate(usage_consumer_stripe_requests_total",
        "rate(usage_consumer_stripe_rate_limit_wait_seconds_total",
        "usage_consumer_stripe_pending_pushes",
        "usage_consumer_stripe_pending_oldest_age_seconds",
        "usage_consumer_reconcile_drift",
        "usage_consumer_emitter_lease_held",
    ):
        assert needed in exprs, f"the dashboard does not show {needed}"
