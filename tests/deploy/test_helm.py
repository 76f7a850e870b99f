"""The Helm chart (helm/usage-consumer): lint, every rendered manifest against the Kubernetes
1.30 schemas and the CRDs' own, the values schema's refusals, and what a deployment relies
on (secrets kept out of ConfigMaps, config changes rolling the pods, a grace period above
the drain, a migration hook that needs nothing from the release)."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from consumer.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "usage-consumer"
CRDS = Path(__file__).parent / "crds"
KUBE = "1.30.0"
RELEASE, NAMESPACE = "uc", "billing"

# Plaintext secrets for the trial value set: none may show up in a ConfigMap.
STRIPE_KEY = "sk_test_trialKey4242"
SASL_PASSWORD = "sasl-pw-e8c1f0"
CLICKHOUSE_PASSWORD = "ch-pw-77d2a9"

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "existing-secrets": {
        "stripe": {"existingSecret": "billing-stripe", "existingSecretKey": "key"},
        "kafka": {"sasl": {"username": "usage", "existingSecret": "kafka-user"}},
        "clickhouse": {"existingSecret": "clickhouse-usage", "existingSecretKey": "pw"},
        "schemaRegistry": {"url": "http://registry:8081", "existingSecret": "registry"},
    },
    "trial-secrets": {
        "stripe": {"existingSecret": "", "apiKey": STRIPE_KEY},
        "kafka": {"sasl": {"username": "usage", "password": SASL_PASSWORD}},
        "clickhouse": {"password": CLICKHOUSE_PASSWORD},
    },
    "autoscaling": {
        "kafka": {"partitions": 6, "autoOffsetReset": "error"},
        "autoscaling": {
            "enabled": True,
            "maxReplicaCount": 6,
            "authenticationRef": "kafka-keda",
            "extraMetadata": {"sasl": "scram_sha512", "tls": "enable"},
        },
    },
    "network-policy": {
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
            ],
            "egress": [{"ports": [{"port": 9092, "protocol": "TCP"}]}],
        }
    },
    "monitoring": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "dashboard": {"enabled": True, "annotations": {"grafana_folder": "Billing"}},
    },
    "reconcile": {
        "reconcile": {"enabled": True, "pushgateway": "http://pushgateway.mon:9091"},
    },
    "static-membership": {
        "kafka": {"staticMembership": True, "consumerLibrdkafka": {"session.timeout.ms": "60000"}}
    },
}

# Custom resources: kubernetes-validate only warns on them, so each is checked against its
# CRD's openAPIV3Schema (vendored from the upstream projects under crds/).
CRD_FILES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobjects.yaml",
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as c:
        yield c


def render(chart: helm_python.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rendered object, NOTES.txt aside."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [
        doc
        for path, text in sorted(out.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in docs
        if d["kind"] == kind
        and (
            component is None
            or d["metadata"]["labels"].get("app.kubernetes.io/component") == component
        )
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def is_hook(doc: dict[str, Any]) -> bool:
    return "helm.sh/hook" in doc["metadata"].get("annotations", {})


def container(doc: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(doc).get("env", [])}


def crd_schema(filename: str) -> dict[str, Any]:
    """The served version's schema, made strict: the API server prunes unknown fields and
    kubectl's strict field validation rejects them, so an unknown field here is an error."""
    crd = yaml.safe_load((CRDS / filename).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    schema: dict[str, Any] = strict(version["schema"]["openAPIV3Schema"])
    return schema


def strict(node: Any) -> Any:
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items()}
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators() -> dict[tuple[str, str], Any]:
    return {key: jsonschema.Draft7Validator(crd_schema(f)) for key, f in CRD_FILES.items()}


def test_app_version_is_the_package_version() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["appVersion"] == pyproject["project"]["version"]


def test_values_schema_is_a_schema_the_defaults_meet() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_lint_is_clean(values: dict[str, Any]) -> None:
    report = helm_python.lint(CHART, values, strict=True, kube_version="v" + KUBE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == []


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_manifest_matches_its_schema(
    chart: helm_python.Chart, values: dict[str, Any], crd_validators: dict[tuple[str, str], Any]
) -> None:
    for doc in render(chart, values):
        key = (doc["apiVersion"], doc["kind"])
        if key in crd_validators:
            errors = [
                f"{list(e.absolute_path)}: {e.message}"
                for e in crd_validators[key].iter_errors(doc)
            ]
            assert errors == [], f"{doc['kind']} {doc['metadata']['name']}"
        else:
            kubernetes_validate.validate(doc, KUBE, strict=True)


def test_the_crd_schemas_are_strict(crd_validators: dict[tuple[str, str], Any]) -> None:
    """An unknown field in a custom resource fails, as it would at the API server."""
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "endpoints": [{"port": "metrics", "scrapeInterval": "30s"}]},
    }
    errors = list(
        crd_validators[("monitoring.coreos.com/v1", "ServiceMonitor")].iter_errors(monitor)
    )
    assert any("scrapeInterval" in e.message for e in errors)


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_the_consumer_accepts_the_rendered_config(
    chart: helm_python.Chart,
    values: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = render(chart, values)
    deployment = one(docs, "Deployment")
    # Every variable the pod gets, so a name the consumer does not know fails here
    # (its settings forbid unknown fields); references stand in for what the kubelet fills.
    for name, var in env_of(deployment).items():
        monkeypatch.setenv(name, var.get("value", "from-a-reference"))
    configmap = next(
        d
        for d in docs
        if d["kind"] == "ConfigMap" and not is_hook(d) and "config.yaml" in d["data"]
    )
    (tmp_path / "config.yaml").write_text(configmap["data"]["config.yaml"])
    settings = load_settings(tmp_path / "config.yaml")
    assert settings.clickhouse.backend == "server"
    assert settings.kafka.control_topic == "usage.events.control"  # the emitter's lease
    assert settings.log.format == "json"
    assert settings.kafka.auto_offset_reset in ("earliest", "error")
    (port,) = container(deployment)["ports"]
    assert port == {
        "name": "metrics",
        "containerPort": settings.pipeline.metrics_port,
        "protocol": "TCP",
    }
    # The migration hook reads the same configuration from its own ConfigMap.
    hook_config = one(docs, "ConfigMap", component="migrate")
    assert hook_config["data"] == configmap["data"]


def test_opt_in_objects_render_only_when_enabled(chart: helm_python.Chart) -> None:
    opt_in = {
        "ServiceMonitor",
        "PrometheusRule",
        "ScaledObject",
        "NetworkPolicy",
        "Secret",
        "CronJob",
    }
    defaults = render(chart, {})
    assert not {d["kind"] for d in defaults} & opt_in
    assert not [d for d in defaults if d["metadata"]["labels"].get("grafana_dashboard")]
    for name, kinds in {
        "monitoring": {"ServiceMonitor", "PrometheusRule"},
        "autoscaling": {"ScaledObject"},
        "network-policy": {"NetworkPolicy"},
        "trial-secrets": {"Secret"},
        "reconcile": {"CronJob"},
    }.items():
        assert kinds <= {d["kind"] for d in render(chart, VALUE_SETS[name])}, name


def test_secret_values_never_reach_a_configmap(chart: helm_python.Chart) -> None:
    docs = render(chart, VALUE_SETS["trial-secrets"])
    plaintext = (STRIPE_KEY, SASL_PASSWORD, CLICKHOUSE_PASSWORD)
    configmaps = [d for d in docs if d["kind"] == "ConfigMap"]
    assert len(configmaps) == 2  # the release's and the migration hook's
    for cm in configmaps:
        text = json.dumps(cm)
        assert not [s for s in plaintext if s in text], cm["metadata"]["name"]
    pod = yaml.safe_dump(one(docs, "Deployment")["spec"]["template"])
    assert not [s for s in plaintext if s in pod]
    # The values went somewhere: into the trial Secret, read through secretKeyRef.
    (secret,) = [d for d in docs if d["kind"] == "Secret" and not is_hook(d)]
    env = env_of(one(docs, "Deployment"))
    for var, key in [
        ("USAGE_CONSUMER_STRIPE__API_KEY", "stripe-api-key"),
        ("USAGE_CONSUMER_KAFKA__SASL_PASSWORD", "kafka-sasl-password"),
        ("USAGE_CONSUMER_CLICKHOUSE__PASSWORD", "clickhouse-password"),
    ]:
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": key}
        assert key in secret["data"]


def test_existing_secrets_are_read_by_reference(chart: helm_python.Chart) -> None:
    docs = render(chart, VALUE_SETS["existing-secrets"])
    assert not [d for d in docs if d["kind"] == "Secret"]  # the chart holds no secret
    refs = {
        name: var["valueFrom"]["secretKeyRef"]
        for name, var in env_of(one(docs, "Deployment")).items()
        if "secretKeyRef" in var.get("valueFrom", {})
    }
    assert refs == {
        "USAGE_CONSUMER_STRIPE__API_KEY": {"name": "billing-stripe", "key": "key"},
        "USAGE_CONSUMER_KAFKA__SASL_PASSWORD": {"name": "kafka-user", "key": "sasl-password"},
        "USAGE_CONSUMER_CLICKHOUSE__PASSWORD": {"name": "clickhouse-usage", "key": "pw"},
        "USAGE_CONSUMER_SCHEMA__REGISTRY_PASSWORD": {
            "name": "registry",
            "key": "registry-password",
        },
    }
    job_env = env_of(one(docs, "Job"))
    assert job_env["USAGE_CONSUMER_CLICKHOUSE__PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "clickhouse-usage",
        "key": "pw",
    }
    assert "USAGE_CONSUMER_STRIPE__API_KEY" not in job_env  # migrations need ClickHouse only


def test_config_checksum_follows_the_config(chart: helm_python.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        pod = one(render(chart, values), "Deployment")["spec"]["template"]
        value: str = pod["metadata"]["annotations"]["checksum/config"]
        return value

    base = checksum({})
    meters = [{"name": "api_calls", "event_name": "api_call", "stripe_event_name": "api_calls"}]
    assert checksum({"meters": meters}) != base
    assert checksum({"kafka": {"topic": "usage.v2"}}) != base
    assert checksum({"replicas": 5}) == base  # not in config.yaml: no needless restart


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_pods_run_locked_down(chart: helm_python.Chart, kind: str) -> None:
    doc = one(render(chart, {}), kind)
    pod = doc["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container(doc)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert (sc["runAsUser"], sc["runAsGroup"]) == (10001, 10001)
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # The one writable place under a read-only root.
    mounts = {m["mountPath"]: m["name"] for m in container(doc)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    resources = container(doc)["resources"]
    assert set(resources) == {"requests", "limits"}


@pytest.mark.parametrize("drain", [1, 30, 600])
def test_grace_period_outlasts_the_drain(chart: helm_python.Chart, drain: int) -> None:
    pod = one(render(chart, {"drainSeconds": drain}), "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > drain


def test_probes_and_command(chart: helm_python.Chart) -> None:
    c = container(one(render(chart, {}), "Deployment"))
    assert c["command"] == ["usage-consumer", "--config", "/etc/usage-consumer/config.yaml", "run"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_static_membership_uses_the_pod_name(chart: helm_python.Chart) -> None:
    var = "USAGE_CONSUMER_KAFKA__GROUP_INSTANCE_ID"
    assert var not in env_of(one(render(chart, {}), "Deployment"))
    env = env_of(one(render(chart, VALUE_SETS["static-membership"]), "Deployment"))
    assert env[var]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_migration_job_needs_nothing_from_the_release(chart: helm_python.Chart) -> None:
    """A pre-install hook runs before the release's own objects exist: everything the Job
    mounts or reads is a hook created before it."""
    docs = render(chart, VALUE_SETS["trial-secrets"])
    job = one(docs, "Job")
    hook = job["metadata"]["annotations"]
    assert hook["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert hook["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    assert container(job)["command"][-1] == "migrate"
    weight = int(hook["helm.sh/hook-weight"])
    needed = {
        v["configMap"]["name"]
        for v in job["spec"]["template"]["spec"]["volumes"]
        if "configMap" in v
    }
    needed |= {
        var["valueFrom"]["secretKeyRef"]["name"]
        for var in container(job)["env"]
        if "secretKeyRef" in var.get("valueFrom", {})
    }
    assert "serviceAccountName" not in job["spec"]["template"]["spec"]
    by_name = {
        d["metadata"]["name"]: d
        for d in docs
        if d["kind"] in ("ConfigMap", "Secret") and is_hook(d)
    }
    assert needed and needed <= set(by_name)
    for name in needed:
        annotations = by_name[name]["metadata"]["annotations"]
        assert int(annotations["helm.sh/hook-weight"]) < weight
        assert "pre-install" in annotations["helm.sh/hook"]


def test_prometheus_rule_carries_the_rules_file(chart: helm_python.Chart) -> None:
    rule = one(render(chart, VALUE_SETS["monitoring"]), "PrometheusRule")
    rules_file = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert rule["spec"]["groups"] == rules_file["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_dashboard_configmap_carries_the_dashboard(chart: helm_python.Chart) -> None:
    docs = render(chart, VALUE_SETS["monitoring"])
    (cm,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard")
    ]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (body,) = cm["data"].values()
    assert json.loads(body) == json.loads((CHART / "files" / "dashboard.json").read_text())


def test_service_monitor_scrapes_the_consumer_service(chart: helm_python.Chart) -> None:
    docs = render(chart, VALUE_SETS["monitoring"])
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [
        service["spec"]["ports"][0]["name"]
    ]


def test_autoscaling_hands_the_replica_count_to_keda(chart: helm_python.Chart) -> None:
    docs = render(chart, VALUE_SETS["autoscaling"])
    scaled, deployment = one(docs, "ScaledObject"), one(docs, "Deployment")
    assert "replicas" not in deployment["spec"]  # else every upgrade resets KEDA's count
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"] <= 6
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == "usage-consumer"
    assert trigger["metadata"]["topic"] == "usage.events"
    assert trigger["metadata"]["sasl"] == "scram_sha512"
    assert trigger["authenticationRef"] == {"name": "kafka-keda"}


def test_disruption_budget_and_service_select_only_consumers(chart: helm_python.Chart) -> None:
    docs = render(chart, {})
    pods = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    job_pods = one(docs, "Job")["spec"]["template"]["metadata"]["labels"]
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    for selector in (
        pdb["spec"]["selector"]["matchLabels"],
        one(docs, "Service")["spec"]["selector"],
    ):
        assert selector.items() <= pods.items()
        assert not selector.items() <= job_pods.items()


# Values the schema (or, for a comparison of two values, the template) refuses, and the
# words the refusal must carry so a person finds the problem.
REFUSED = {
    "latest-offset-reset": ({"kafka": {"autoOffsetReset": "latest"}}, "/kafka/autoOffsetReset"),
    "no-replicas": ({"replicas": 0}, "/replicas"),
    "negative-drain": ({"drainSeconds": -5}, "/drainSeconds"),
    "unknown-top-level-key": ({"replicaCount": 3}, "'replicaCount' not allowed"),
    "stripe-key-beside-existing-secret": ({"stripe": {"apiKey": STRIPE_KEY}}, "/stripe/apiKey"),
    "stripe-without-a-key": ({"stripe": {"existingSecret": ""}}, "/stripe/existingSecret"),
    "secret-through-extra-config": (
        {"extraConfig": {"clickhouse": {"password": CLICKHOUSE_PASSWORD}}},
        "/extraConfig/clickhouse/password",
    ),
    "scale-to-zero": ({"autoscaling": {"enabled": True, "minReplicaCount": 0}}, "minReplicaCount"),
}


@pytest.mark.parametrize(("values", "problem"), REFUSED.values(), ids=REFUSED.keys())
def test_schema_refuses(chart: helm_python.Chart, values: dict[str, Any], problem: str) -> None:
    report = helm_python.lint(CHART, values, strict=True, kube_version="v" + KUBE)
    assert any(problem in e for e in report["errors"]), report["errors"]
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(problem)) as refused:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    # A refusal names the field, never a secret's value (install logs travel).
    assert not [s for s in (STRIPE_KEY, CLICKHOUSE_PASSWORD) if s in str(refused.value)]


def test_autoscaling_beyond_the_partitions_is_refused(chart: helm_python.Chart) -> None:
    # Two values compared: beyond JSON Schema, so the template fails (helm lint skips
    # `fail`, install and template do not).
    values = {"kafka": {"partitions": 3}, "autoscaling": {"enabled": True, "maxReplicaCount": 4}}
    with pytest.raises(
        helm_python.HelmRenderError, match=r"maxReplicaCount \(4\) exceeds kafka.partitions \(3\)"
    ):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    values["kafka"]["partitions"] = 4
    assert one(render(chart, values), "ScaledObject")["spec"]["maxReplicaCount"] == 4


def test_reconcile_cronjob_pushes_its_drift(chart: helm_python.Chart) -> None:
    job = one(render(chart, VALUE_SETS["reconcile"]), "CronJob")
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[3:] == [
        "reconcile", "--window", "hour", "--tolerance", "0",
        "--pushgateway", "http://pushgateway.mon:9091",
    ]  # fmt: skip
    # the commands the consumer's CLI really has, with these options
    from consumer.cli import parser

    args = parser().parse_args(command[1:])
    assert (args.command, args.pushgateway) == ("reconcile", "http://pushgateway.mon:9091")
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert "USAGE_CONSUMER_STRIPE__API_KEY" in env  # it reads Stripe's summaries
    assert pod["securityContext"]["runAsNonRoot"] is True
