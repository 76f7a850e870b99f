"""Every check `doctor` runs, in the order the table lists them, and the fix each names
when its service gives no answer."""

from __future__ import annotations

from consumer.clock import Clock
from consumer.config import Settings
from consumer.ops.doctor import kafka_checks, registry_check, store_checks, stripe_checks
from consumer.ops.doctor.report import Finding
from consumer.ops.doctor.runner import Check, Env, run_checks

CHECKS = [
    Check(
        "kafka",
        kafka_checks.topics,
        "check kafka.bootstrap_servers (host:port of a broker) and that the broker is up",
    ),
    Check(
        "clock skew",
        kafka_checks.clock_skew,
        "check kafka.bootstrap_servers and that the broker is up (the probe needs it)",
    ),
    Check(
        "clickhouse",
        store_checks.clickhouse,
        "check clickhouse.host/port/username/password (or chdb_path) and that it is up",
    ),
    Check(
        "schema registry",
        registry_check.registry,
        "check schema.registry_url and that the registry is up",
    ),
    Check(
        "stripe meters",
        stripe_checks.meters,
        "check stripe.api_base and stripe.api_key (a key Stripe accepts) and the network",
    ),
    Check(
        "stripe rate",
        stripe_checks.request_rate,
        "check stripe.requests_per_second and stripe.api_key",
    ),
    Check(
        "invoice grace",
        stripe_checks.invoice_grace,
        "check the meters' allowed_lateness_seconds and stripe.invoice_grace_period_seconds",
    ),
]


def run_doctor(settings: Settings, clock: Clock, timeout: float = 10.0) -> list[Finding]:
    """Run every check at once; each has `timeout` seconds (a service that does not answer
    in time is a FAIL, never a hang)."""
    return run_checks(CHECKS, Env(settings, clock, timeout))
