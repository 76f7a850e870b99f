"""`usage-consumer doctor` against the real stand-ins: Tansu, chDB, the Stripe emulator, the
registry stand-in. Every case sets up what `run` relies on correctly, breaks one thing, and
reads the row, its fix and the exit code."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import stripe
import yaml

from consumer.cli import main
from consumer.clock import SystemClock
from consumer.config import Settings
from consumer.ingest.kafka import TopicIds, ensure_control_topic
from consumer.local.broker import TansuBroker
from consumer.local.emulator import EmulatorServer
from consumer.ops.doctor.checks import CHECKS, run_doctor
from consumer.ops.doctor.report import Finding, Status, format_report
from consumer.ops.doctor.runner import Env, exit_code, run_checks
from consumer.store import open_store
from consumer.store.prepare import prepare_store
from tests.chaos.registry import Registry
from tests.integration.conftest import STRIPE_KEY, emulator_with_meters, make_settings

WEEK_MS = str(7 * 86_400_000)


@pytest.fixture(scope="module")
def stripe_emulator() -> Iterator[EmulatorServer]:
    """This module's own emulator: the meters it breaks are seen by no other test."""
    server = emulator_with_meters(seed=19)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    r = Registry()
    yield r
    r.stop()


def _setup(
    broker: TansuBroker, emulator: EmulatorServer, tmp: Path, name: str, **overrides: Any
) -> Settings:
    """What an operator sets up before `run`: the topics (retention a week), the control
    topic as `run` makes it, the schema; grace two hours, so a lateness of one fits."""
    stripe_cfg = {"invoice_grace_period_seconds": 7200, **overrides.pop("stripe", {})}
    kafka = {"control_topic": f"{name}.control"}
    settings = make_settings(
        broker, emulator, tmp, name, stripe=stripe_cfg, kafka=kafka, **overrides
    )
    k = settings.kafka
    week = {"retention.ms": WEEK_MS}
    broker.create_topics({k.topic: 3, k.dlq_topic: 1, k.late_topic: 1}, config=week)
    ensure_control_topic(k)
    store = open_store(settings.clickhouse)
    try:
        prepare_store(store, settings.clickhouse)
    finally:
        store.close()
    return settings


def _doctor(settings: Settings, timeout: float = 10.0, skew: float = 0.0) -> list[Finding]:
    findings = run_doctor(settings, SystemClock(skew), timeout)
    print(format_report(findings))  # shown when a test fails
    return findings


def _only(settings: Settings, check: str) -> Finding:
    """The one row of one check, run alone (the others are not what a test reads)."""
    (found,) = [c for c in CHECKS if c.name == check]
    (row,) = run_checks([found], Env(settings, SystemClock(), 10.0))
    return row


def _row(findings: list[Finding], check: str) -> Finding:
    (row,) = [f for f in findings if f.check == check]
    return row


def test_a_correct_setup_is_all_ok(
    broker: TansuBroker, stripe_emulator: EmulatorServer, registry: Registry, tmp_path: Path,
    unique: str,
) -> None:  # fmt: skip
    registry.subjects[f"{unique}.events-value"] = 4
    settings = _setup(
        broker, stripe_emulator, tmp_path, unique, schema={"registry_url": registry.url}
    )
    findings = _doctor(settings)
    assert [f for f in findings if f.status is not Status.OK] == []
    checks = {f.check for f in findings}
    k = settings.kafka
    assert {f"topic {t}" for t in (k.topic, k.dlq_topic, k.late_topic, k.control_topic)} <= checks
    assert {"meter api_calls", "meter tokens", "meter storage_gb", "clickhouse"} <= checks
    assert "id 4, readable" in _row(findings, "schema registry").detail
    # Tansu records LogAppendTime without stamping it: said, not failed.
    assert "not measurable" in _row(findings, "clock skew").detail
    assert exit_code(findings) == 0


def test_misconfigured_meters_fail_with_the_fix_named(
    broker: TansuBroker, stripe_emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    api = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": stripe_emulator.url})
    wrong = f"{unique}_wrong"
    api.v1.billing.meters.create(
        {"display_name": wrong, "event_name": wrong, "default_aggregation": {"formula": "last"}}
    )
    base = {"aggregation": "sum", "emission": "aggregated"}
    meters = [
        {"name": "wrong_formula", "event_name": "a", "stripe_event_name": wrong, **base},
        {"name": "missing", "event_name": "b", "stripe_event_name": f"{unique}_none", **base},
    ]
    settings = _setup(broker, stripe_emulator, tmp_path, unique, meters=meters)
    findings = _doctor(settings)
    conflict = _row(findings, "meter wrong_formula")
    assert conflict.status is Status.FAIL
    assert "formula is 'last', configured 'sum'" in conflict.detail
    assert "cannot change a meter's formula" in conflict.fix
    missing = _row(findings, "meter missing")
    assert missing.status is Status.FAIL and f"{unique}_none" in missing.detail
    assert missing.fix == "run `usage-consumer meters sync` (creates it)"
    assert exit_code(findings) == 2


def test_a_missing_topic_short_retention_and_lost_partitions(
    broker: TansuBroker, stripe_emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings = make_settings(broker, stripe_emulator, tmp_path, unique)
    k = settings.kafka
    hour = str(3_600_000)  # the source must outlive lateness (1 h) + dedup horizon (6 h)
    broker.create_topics({k.topic: 2}, config={"retention.ms": hour})
    broker.create_topics({k.late_topic: 1}, config={"retention.ms": WEEK_MS})
    findings = _doctor(settings)
    dlq = _row(findings, f"topic {k.dlq_topic}")
    assert dlq.status is Status.FAIL and "does not exist" in dlq.detail
    assert f"--create --topic {k.dlq_topic}" in dlq.fix
    source = _row(findings, f"topic {k.topic}")
    assert source.status is Status.FAIL
    assert "retention 1h is shorter than the lateness + dedup horizon (7h)" in source.detail
    assert f"--entity-name {k.topic} --add-config retention.ms=" in source.fix
    assert _row(findings, f"topic {k.late_topic}").status is Status.OK
    # The store holds state for partition 4 of this topic, which has 2: re-created smaller.
    store = open_store(settings.clickhouse)
    try:
        prepare_store(store, settings.clickhouse)
        store.command(
            """INSERT INTO ingest_latest (group_id, topic, partition, topic_id, range_start,
               range_end, state_rank, epoch, attempt, snapshot, written_at, version)
               VALUES ({g:String}, {t:String}, 4, {id:String}, 0, 10, 2, 1, 1, '', now64(3), 1)""",
            {"g": k.group_id, "t": k.topic, "id": TopicIds(k)(k.topic)},
        )
    finally:
        store.close()
    source = _row(_doctor(settings), f"topic {k.topic}")
    assert source.status is Status.FAIL
    assert "2 partitions, but the store has ingest state for 5" in source.detail
    assert f"--alter --topic {k.topic} --partitions 5" in source.fix


def test_the_control_topic_one_partition_and_stamped_by_the_broker(
    broker: TansuBroker, stripe_emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    control = f"{unique}.control"
    settings = make_settings(
        broker, stripe_emulator, tmp_path, unique, kafka={"control_topic": control}
    )
    broker.create_topics({control: 2})  # by hand: two partitions, producers' timestamps
    row = _row(_doctor(settings), f"topic {control}")
    assert row.status is Status.FAIL and "2 partitions: the emitter lease needs exactly one" in (
        row.detail
    )
    skew = _only(settings, "clock skew")
    assert skew.status is Status.WARN and "keeps producers' timestamps" in skew.detail
    assert f"--entity-name {control} --add-config message.timestamp.type=LogAppendTime" in (
        skew.fix
    )


def test_connect_meters_are_checked_in_every_account(
    broker: TansuBroker, stripe_emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    """Meters exist per connected account: one account has them, the other has none."""
    accounts = {"a": f"acct_{unique}A", "b": f"acct_{unique}B"}
    api = stripe.StripeClient(STRIPE_KEY, base_addresses={"api": stripe_emulator.url})
    meter = {"name": "calls", "event_name": "c", "stripe_event_name": f"{unique}_calls"}
    api.v1.billing.meters.create(
        {
            "display_name": "calls",
            "event_name": f"{unique}_calls",
            "default_aggregation": {"formula": "sum"},
        },
        {"stripe_account": accounts["a"]},
    )
    settings = _setup(
        broker, stripe_emulator, tmp_path, unique, meters=[meter],
        stripe={"account_property": "tenant", "accounts": accounts},
    )  # fmt: skip
    findings = _doctor(settings)
    assert _row(findings, f"meter calls in {accounts['a']}").status is Status.OK
    missing = _row(findings, f"meter calls in {accounts['b']}")
    assert missing.status is Status.FAIL and "meters sync" in missing.fix


def test_pending_and_unknown_migrations(
    broker: TansuBroker, stripe_emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    settings = make_settings(broker, stripe_emulator, tmp_path, unique)
    row = _only(settings, "clickhouse")
    assert row.status is Status.WARN and "migrations 1-" in row.detail
    assert "usage-consumer migrate" in row.fix
    store = open_store(settings.clickhouse)
    try:
        prepare_store(store, settings.clickhouse)
        store.command("INSERT INTO schema_migrations (version, name) VALUES (999, 'future')")
    finally:
        store.close()
    row = _only(settings, "clickhouse")
    assert row.status is Status.FAIL and "migrations 999 are newer than this build" in row.detail


@pytest.fixture
def silent() -> Iterator[str]:
    """host:port of a socket that takes connections and never answers (a hung service)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_services_fail_within_the_timeout(
    stripe_emulator: EmulatorServer, tmp_path: Path, unique: str, silent: str
) -> None:
    host, port = silent.split(":")
    url = f"http://{silent}"
    hung = type("Hung", (), {"bootstrap": silent})()
    settings = make_settings(
        hung, stripe_emulator, tmp_path, unique,
        clickhouse={"backend": "server", "host": host, "port": int(port)},
        stripe={"api_base": url, "meter_events_base": url},
        schema={"registry_url": url},
    )  # fmt: skip
    started = time.monotonic()
    findings = _doctor(settings, timeout=1.5)
    took = time.monotonic() - started
    print(f"doctor with every service hung: {took:.1f} s")
    fixes = {c.name: c.unreachable for c in CHECKS}
    for check in ("kafka", "clock skew", "clickhouse", "schema registry", "stripe meters"):
        row = _row(findings, check)
        assert row.status is Status.FAIL, row
        assert row.fix == fixes[check]
    # The grace check reads the outbox by the way: a hung store leaves its row standing.
    grace = _row(findings, "invoice grace")
    assert grace.status is Status.WARN and "backlog unknown" in grace.detail
    assert exit_code(findings) == 2


def test_the_grace_check_weighs_lateness_retries_and_the_backlog(
    broker: TansuBroker, stripe_emulator: EmulatorServer, tmp_path: Path, unique: str
) -> None:
    one_hour = {"stripe": {"invoice_grace_period_seconds": 3600}}
    settings = _setup(broker, stripe_emulator, tmp_path, unique, **one_hour)
    grace = _only(settings, "invoice grace")  # lateness 1 h + retries > 1 h
    assert grace.status is Status.WARN, grace
    # retries: 0.25 s doubling to 30 s over 8 attempts (61.75 s), and a 0.1 s poll
    assert "lateness 1h (api_calls) + retries 1m1s + backlog 0s" in grace.detail
    assert "allowed_lateness_seconds to at most 3538" in grace.fix
    assert "stripe.invoice_grace_period_seconds" in grace.fix
    late = [dict(m, allowed_lateness_seconds=7200) for m in settings.model_dump()["meters"]]
    longer = settings.model_copy(update={"meters": Settings(meters=late).meters})
    grace = _only(longer, "invoice grace")
    assert grace.status is Status.FAIL and "late usage misses its invoice" in grace.detail
    # Two hours of grace fit an hour's lateness, until the outbox holds a push 3 h old.
    roomy = settings.model_copy(
        update={"stripe": settings.stripe.model_copy(update={"invoice_grace_period_seconds": 7200})}
    )
    assert _only(roomy, "invoice grace").status is Status.OK
    store = open_store(settings.clickhouse)
    try:
        store.command(
            """INSERT INTO stripe_open (identifier, status_rank, held, version, stripe_timestamp)
               VALUES ('p1', 1, 0, 2, now64(3) - INTERVAL 3 HOUR)"""
        )
    finally:
        store.close()
    grace = _only(roomy, "invoice grace")
    assert grace.status is Status.FAIL and "backlog 3h (1 pushes)" in grace.detail
    assert "outbox is older than the grace period" in grace.detail
    assert "get sending going again" in grace.fix


def test_the_registry_check_reads_the_latest_schema(
    broker: TansuBroker, stripe_emulator: EmulatorServer, registry: Registry, tmp_path: Path,
    unique: str,
) -> None:  # fmt: skip
    subject = f"{unique}.events-value"
    settings = _setup(
        broker, stripe_emulator, tmp_path, unique, schema={"registry_url": registry.url}
    )
    row = _only(settings, "schema registry")
    assert row.status is Status.WARN and f"no schema registered under {subject}" in row.detail
    v4 = json.loads(json.loads(registry.bodies[4])["schema"])
    for field in v4["fields"]:
        if field["name"] == "value":
            field["type"]["scale"] = 2  # the reader's decimal has another scale
    registry.bodies[90] = json.dumps({"schema": json.dumps(v4)}).encode()
    registry.subjects[subject] = 90
    row = _only(settings, "schema registry")
    assert row.status is Status.FAIL and "id 90, which the reader schema cannot read" in row.detail
    assert "decimal(38,2)" in row.detail


def test_the_cli_prints_the_table_and_exits_by_the_worst(
    broker: TansuBroker, stripe_emulator: EmulatorServer, tmp_path: Path, unique: str,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    config = tmp_path / "config.yaml"  # no topics made: the dead-letter topic is missing
    config.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap_servers": broker.bootstrap, "topic": f"{unique}.events",
                          "dlq_topic": f"{unique}.dlq", "late_topic": f"{unique}.late"},
                "clickhouse": {"chdb_path": str(tmp_path / "chdb")},
                "stripe": {"api_base": stripe_emulator.url},
            }
        )
    )  # fmt: skip
    monkeypatch.setenv("USAGE_CONSUMER_STRIPE__API_KEY", STRIPE_KEY)
    assert main(["--config", str(config), "doctor", "--timeout", "5"]) == 2
    out = capsys.readouterr().out
    assert f"FAIL topic {unique}.dlq: create it" in out
    assert out.rstrip().splitlines()[-1].startswith("doctor: FAIL (ok=")
    assert STRIPE_KEY not in out
