"""A real scrape: Prometheus and Alertmanager (Debian's packages) against `usage-consumer
run` on the local stand-ins (Tansu, chDB, the Stripe emulator), with real faults.

(a) The emulator answers every stream request with a 500: the outbox backlog alert fires in
    Prometheus, reaches a webhook through Alertmanager, and resolves once Stripe answers.
(b) A stream of undecodable messages: the dead-letter rate alert fires.

The production rules stay as they are. The test loads a copy in which every duration (range
selectors, offsets, `for:`) is divided by SCALE with a floor of FLOOR_SECONDS, so a 15-minute
window takes 5 seconds; thresholds (counts, ratios, ages) are left alone.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.local.broker import TansuBroker, free_port
from consumer.local.emulator import EmulatorServer
from consumer.producer import UsageProducer
from tests.integration.conftest import STRIPE_KEY, emulator_with_meters, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "helm" / "usage-consumer" / "files" / "prometheus-rules.yaml"
PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
SCALE = 180
FLOOR_SECONDS = 3  # a rate needs two scrapes (1 s apart) in its window
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}

needs_servers = pytest.mark.skipif(
    PROMETHEUS is None or ALERTMANAGER is None,
    reason="needs prometheus and prometheus-alertmanager (Debian packages; .ci/run installs them)",
)


def shortened(duration: str) -> str:
    """A Prometheus duration divided by SCALE, in whole seconds, at least FLOOR_SECONDS."""
    parts = re.findall(r"(\d+)(ms|[smhdwy])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)
    return f"{max(FLOOR_SECONDS, math.ceil(seconds / SCALE))}s"


def fast_rules(text: str) -> dict[str, Any]:
    """The rules file with every duration shortened."""
    doc: dict[str, Any] = yaml.safe_load(text)
    for group in doc["groups"]:
        for rule in group["rules"]:
            expr = re.sub(r"\[(\w+)\]", lambda m: f"[{shortened(m.group(1))}]", rule["expr"])
            rule["expr"] = re.sub(
                r"\boffset\s+(\w+)", lambda m: f"offset {shortened(m.group(1))}", expr
            )
            if "for" in rule:
                rule["for"] = shortened(rule["for"])
    return doc


def test_durations_are_shortened_and_nothing_else() -> None:
    assert [shortened(d) for d in ("15m", "10m", "5m", "1h", "1d", "1h30m")] == [
        "5s",
        "4s",
        "3s",
        "20s",
        "480s",
        "30s",
    ]
    fast = fast_rules(RULES.read_text())
    original = yaml.safe_load(RULES.read_text())
    rules = [r for g in fast["groups"] for r in g["rules"]]
    before = [r for g in original["groups"] for r in g["rules"]]
    assert [r["alert"] for r in rules] == [r["alert"] for r in before]
    for rule, was in zip(rules, before, strict=True):
        assert re.findall(r"\[(\w+)\]", rule["expr"]) == [
            shortened(d) for d in re.findall(r"\[(\w+)\]", was["expr"])
        ]
        strip = r"\[\w+\]|offset \w+"
        assert re.sub(strip, "", rule["expr"]) == re.sub(strip, "", was["expr"])
        assert rule["labels"] == was["labels"] and rule["annotations"] == was["annotations"]


# -- the services -------------------------------------------------------------------------


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            status: int = r.status
    except (urllib.error.URLError, OSError):
        return False
    return status == 200


@contextmanager
def running(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    """A process for the test's length; its output in `log` (shown when a wait fails)."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Webhook:
    """Alertmanager's receiver: every notification POSTed to it, in order."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        lock = threading.Lock()
        received = self.notifications

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    received.append(body)
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forget(self) -> None:
        """Drop what was received so far."""
        self.notifications.clear()

    def got(self, alertname: str, status: str) -> bool:
        return any(
            a["labels"]["alertname"] == alertname and a["status"] == status
            for n in list(self.notifications)
            for a in n["alerts"]
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def alerts(self, state: str) -> set[str]:
        found = get_json(f"{self.url}/api/v1/alerts")["data"]["alerts"]
        return {a["labels"]["alertname"] for a in found if a["state"] == state}

    def value(self, expr: str) -> float | None:
        q = urllib.parse.urlencode({"query": expr})
        result = get_json(f"{self.url}/api/v1/query?{q}")["data"]["result"]
        return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorServer]:
    """An emulator of this module's own: the test breaks it on purpose."""
    server = emulator_with_meters(seed=3)
    yield server
    server.stop()


@pytest.fixture
def monitoring(tmp_path: Path) -> Iterator[tuple[Prometheus, Webhook, int]]:
    """Alertmanager delivering to a webhook, and Prometheus evaluating the fast rules every
    second against a consumer's metrics port (returned: start the consumer there)."""
    assert PROMETHEUS is not None and ALERTMANAGER is not None
    webhook = Webhook()
    am_port, prom_port, metrics_port = free_port(), free_port(), free_port()
    (tmp_path / "am.yml").write_text(
        yaml.safe_dump(
            {
                "route": {
                    "receiver": "hook",
                    "group_by": ["alertname"],
                    "group_wait": "1s",
                    "group_interval": "1s",
                    "repeat_interval": "1h",
                },
                "receivers": [
                    {
                        "name": "hook",
                        "webhook_configs": [{"url": webhook.url, "send_resolved": True}],
                    }
                ],
            }
        )
    )
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(fast_rules(RULES.read_text())))
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "evaluation_interval": "1s",
                },
                "rule_files": [str(tmp_path / "rules.yml")],
                "alerting": {
                    "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]
                },
                "scrape_configs": [
                    {
                        "job_name": "usage-consumer",
                        "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                    }
                ],
            }
        )
    )
    am = [
        ALERTMANAGER,
        f"--config.file={tmp_path / 'am.yml'}",
        f"--storage.path={tmp_path / 'am'}",
        f"--web.listen-address=127.0.0.1:{am_port}",
        "--cluster.listen-address=",
    ]
    prom = [
        PROMETHEUS,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
    ]
    try:
        with (
            running(am, tmp_path / "alertmanager.log"),
            running(prom, tmp_path / "prometheus.log"),
        ):
            wait_for(lambda: answers(f"http://127.0.0.1:{am_port}/-/ready"), "alertmanager", 30)
            wait_for(lambda: answers(f"http://127.0.0.1:{prom_port}/-/ready"), "prometheus", 30)
            yield Prometheus(f"http://127.0.0.1:{prom_port}"), webhook, metrics_port
    finally:
        webhook.close()


def consumer_env(
    broker: TansuBroker, emulator: EmulatorServer, tmp: Path, name: str, port: int
) -> dict[str, str]:
    return {
        **os.environ,
        "USAGE_CONSUMER_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
        "USAGE_CONSUMER_KAFKA__TOPIC": f"{name}.events",
        "USAGE_CONSUMER_KAFKA__DLQ_TOPIC": f"{name}.dlq",
        "USAGE_CONSUMER_KAFKA__LATE_TOPIC": f"{name}.late",
        "USAGE_CONSUMER_KAFKA__CONTROL_TOPIC": f"{name}.control",
        "USAGE_CONSUMER_KAFKA__GROUP_ID": name,
        "USAGE_CONSUMER_KAFKA__CONSUMER_LIBRDKAFKA": json.dumps(
            {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}
        ),
        "USAGE_CONSUMER_CLICKHOUSE__CHDB_PATH": str(tmp / "chdb"),
        "USAGE_CONSUMER_STRIPE__API_KEY": STRIPE_KEY,
        "USAGE_CONSUMER_STRIPE__API_BASE": emulator.url,
        "USAGE_CONSUMER_STRIPE__METER_EVENTS_BASE": emulator.url,
        "USAGE_CONSUMER_STRIPE__REQUESTS_PER_SECOND": "1000",
        "USAGE_CONSUMER_STRIPE__POLL_INTERVAL_SECONDS": "0.1",
        # A failed request fails its cycle at once: the emitter's own backoff (doubling
        # from the poll interval) is then what bounds how soon it notices Stripe is back.
        "USAGE_CONSUMER_STRIPE__MAX_RETRIES": "0",
        "USAGE_CONSUMER_PIPELINE__BATCH_MAX_SECONDS": "0.2",
        # A range of nothing but bad messages is dead-lettered, not a stop: (b) is about
        # the dead-letter rate, and a stop would take the target down instead.
        "USAGE_CONSUMER_PIPELINE__MAX_INVALID_RATIO": "1",
        "USAGE_CONSUMER_PIPELINE__METRICS_HOST": "127.0.0.1",
        "USAGE_CONSUMER_PIPELINE__METRICS_PORT": str(port),
    }


def produce_usage(producer: UsageProducer, prefix: str, n: int) -> None:
    now_ms = int(time.time() * 1000)
    for i in range(n):
        producer.send(
            event_id=f"{prefix}-{i}",
            event_name="tokens",  # per_event: one outbox push per event, at once
            customer_id=f"cus_{prefix}_{i % 5}",
            value=Decimal(1),
            timestamp_ms=now_ms,
        )
    producer.flush()


@contextmanager
def flooding(producer: UsageProducer) -> Iterator[None]:
    """Undecodable messages, 100 a second, until the block ends."""
    stop = threading.Event()

    def flood() -> None:
        i = 0
        while not stop.is_set():
            for _ in range(10):
                producer.send_raw(f"bad/{i}".encode(), b"\x00not avro at all")
                i += 1
            producer.flush(5)
            stop.wait(0.1)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


@needs_servers
def test_alerts_fire_reach_alertmanager_and_resolve(
    broker: TansuBroker,
    emulator: EmulatorServer,
    monitoring: tuple[Prometheus, Webhook, int],
    tmp_path: Path,
    unique: str,
) -> None:
    prometheus, webhook, port = monitoring
    name = f"scrape{unique}"
    broker.create_topics({f"{name}.events": 3, f"{name}.dlq": 1, f"{name}.late": 1})
    producer = UsageProducer({"bootstrap.servers": broker.bootstrap}, topic=f"{name}.events")
    env = consumer_env(broker, emulator, tmp_path, name, port)
    log = tmp_path / "consumer.log"
    backlog, dlq = "UsageConsumerStripeBacklog", "UsageConsumerDeadLetterRate"

    def waiting(cond: Callable[[], bool], what: str, timeout: float) -> None:
        try:
            wait_for(cond, what, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log.read_text()[-3000:]}") from None

    with running([sys.executable, "-m", "consumer.cli", "run"], log, env):
        # Healthy: usage reaches Stripe, Prometheus sees it, and neither alert is raised.
        produce_usage(producer, f"{name}-ok", 50)
        waiting(
            lambda: (
                (prometheus.value("sum(usage_consumer_stripe_events_emitted_total)") or 0) >= 50
            ),
            "the first usage delivered to Stripe, as scraped",
            60,
        )
        # With every window cut to seconds, a slow start (the lease, the meters check, a busy
        # host) is itself a backlog for a moment; the healthy state is what follows it:
        # nothing pending, and neither alert firing nor pending.
        waiting(
            lambda: (
                prometheus.value("sum(usage_consumer_stripe_pending_pushes)") == 0
                and not {backlog, dlq}
                & (prometheus.alerts("firing") | prometheus.alerts("pending"))
            ),
            "healthy: nothing pending, no alert",
            60,
        )
        webhook.forget()  # what a slow start sent is not what (a) must show

        # (a) Stripe answers 500: the outbox keeps what it cannot send.
        post_json(f"{emulator.url}/_emulator/config", {"rate_5xx": 1.0})
        produce_usage(producer, f"{name}-held", 50)
        waiting(lambda: backlog in prometheus.alerts("firing"), f"{backlog} firing", 40)
        assert (prometheus.value("usage_consumer_stripe_pending_pushes") or 0) > 0
        waiting(lambda: webhook.got(backlog, "firing"), f"{backlog} delivered", 15)
        post_json(f"{emulator.url}/_emulator/config", {"rate_5xx": 0.0})
        waiting(lambda: webhook.got(backlog, "resolved"), f"{backlog} resolved", 45)
        assert prometheus.value("usage_consumer_stripe_pending_pushes") == 0
        assert dlq not in prometheus.alerts("firing")

        # (b) A flood of undecodable messages: dead letters, and the alert on their rate.
        with flooding(producer):
            waiting(lambda: dlq in prometheus.alerts("firing"), f"{dlq} firing", 30)
            waiting(lambda: webhook.got(dlq, "firing"), f"{dlq} delivered", 15)
        dead = prometheus.value("sum(usage_consumer_events_invalid_total)")
        assert dead is not None and dead > 0
