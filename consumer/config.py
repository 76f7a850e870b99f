"""Typed configuration: environment variables (USAGE_CONSUMER_*) plus an optional YAML file.

Everything is validated at start; a bad value fails with the field's path and the problem,
never with the value itself (it may be a secret).
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

Aggregation = Literal["sum", "count", "min", "max", "last", "first", "avg"]
BILLABLE = frozenset({"sum", "count", "last"})


class ConfigError(Exception):
    """A configuration problem, phrased as `field.path: problem` lines."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MeterConfig(_Frozen):
    """One meter: which events feed it, how they aggregate, and how they reach Stripe."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$", description="meter key in ClickHouse")
    event_name: str = Field(min_length=1, max_length=100, description="incoming event_name")
    aggregation: Aggregation = "sum"
    window_seconds: int = Field(60, description="Stripe bucket size for aggregated mode")
    allowed_lateness_seconds: int = Field(3600, ge=0, le=72 * 3600)
    stripe_event_name: str | None = Field(None, min_length=1, max_length=100)
    emission: Literal["per_event", "aggregated"] = "aggregated"
    max_value: Decimal = Field(Decimal("1e15"), gt=0)
    stripe_value_format: Literal["whole", "decimal"] = Field(
        "whole", description="whole: integers, fractions carried between pushes (Stripe's rule)"
    )
    stripe_formula: Literal["sum", "count", "last"] | None = Field(
        None, description="the Stripe meter's formula; derived from aggregation and emission"
    )
    stripe_event_time_window: Literal["hour", "day"] | None = Field(
        None, description="a pre-aggregated Stripe meter: only each window's last event counts"
    )
    stripe_customer_key: str = Field("stripe_customer_id", min_length=1, max_length=100)
    stripe_value_key: str = Field("value", min_length=1, max_length=100)

    @property
    def formula(self) -> str:
        """The Stripe meter formula this meter bills through."""
        if self.stripe_formula is not None:
            return self.stripe_formula
        if self.emission == "aggregated":
            return "sum"  # pushes carry partial sums, even of a count
        return self.aggregation

    @model_validator(mode="after")
    def _check(self) -> MeterConfig:
        if self.window_seconds < 60 or self.window_seconds % 60 or 86400 % self.window_seconds:
            raise ValueError("window_seconds must be a whole number of minutes dividing a day")
        if self.stripe_event_name is None:
            return self
        if self.aggregation not in BILLABLE:
            raise ValueError(
                f"aggregation {self.aggregation!r} is ClickHouse-only: Stripe meters bill "
                "sum, count or last; remove stripe_event_name"
            )
        if self.emission == "aggregated" and self.aggregation not in ("sum", "count"):
            raise ValueError(
                "aggregated emission sends deltas, which only a sum (or count) can take; "
                "use emission per_event"
            )
        if self.emission == "aggregated" and self.formula != "sum":
            raise ValueError(
                f"aggregated emission needs a Stripe sum meter: a {self.formula} meter would "
                "count or keep pushes (partial sums), not usage"
            )
        if self.emission == "per_event" and self.formula != self.aggregation:
            raise ValueError(
                f"a per_event {self.aggregation} meter bills through a Stripe "
                f"{self.aggregation} meter, not {self.formula}: Stripe would bill otherwise "
                "than ClickHouse counts"
            )
        if self.stripe_event_time_window is not None and self.formula != "last":
            raise ValueError(
                "stripe_event_time_window meters keep only the last event of each window, so "
                f"they cannot take partial sums or counts ({self.formula}); use a last meter"
            )
        return self


class KafkaConfig(_Frozen):
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "usage.events"
    dlq_topic: str = "usage.events.dlq"
    late_topic: str = "usage.events.late"
    group_id: str = "usage-consumer"
    control_topic: str | None = Field(
        "usage.events.control",
        description="one partition; its holder (group `<group_id>.emitter`) is the store's "
        "emitter; created if missing; None: no lease (one process per store only)",
    )
    auto_offset_reset: Literal["earliest", "latest", "error"] = "earliest"
    group_instance_id: str | None = Field(
        None,
        min_length=1,
        max_length=249,
        description="static group membership (KIP-345) for the events consumer: a restart "
        "with the same id gets its partitions back without a rebalance; unique per process "
        "(Kubernetes: the pod name); docs/operations.md says when it helps",
    )
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    librdkafka: dict[str, str] = Field(default_factory=dict, description="every client, as is")
    consumer_librdkafka: dict[str, str] = Field(default_factory=dict, description="consumer only")
    producer_librdkafka: dict[str, str] = Field(default_factory=dict, description="producer only")


class SchemaConfig(_Frozen):
    mode: Literal["confluent", "plain"] = "confluent"
    registry_url: str | None = Field(
        None, description="Confluent schema registry; None = the packaged id map"
    )
    registry_username: str | None = None
    registry_password: SecretStr | None = None
    plain_writer_schema: Path | None = None
    fast_decoder: bool = Field(
        True, description="decode with the C fast path where built; false: fastavro for all"
    )

    @model_validator(mode="after")
    def _check(self) -> SchemaConfig:
        if self.mode == "plain" and self.plain_writer_schema is None:
            raise ValueError("plain mode needs plain_writer_schema (a .avsc path)")
        return self


# Stripe's 35 days a cancel may reach back (sinks/rollup.CANCEL_REACH_MS), and a day's margin.
LEDGER_MIN_DAYS = 36


class RetentionConfig(_Frozen):
    """Days each growing table keeps its rows (0: for ever); applied as table TTLs at start
    (consumer/store/retention.py). docs/operations.md says what each one must outlive."""

    ledger_days: int = Field(
        0, ge=0, description="usage_events and cancellations (0 or at least 36 + max_past_days)"
    )
    windows_days: int = Field(0, ge=0, description="usage_windows, what analysts read")
    dead_letters_days: int = Field(90, ge=1, description="dead_letters, by Kafka record time")
    late_events_days: int = Field(90, ge=1, description="late_events, by Kafka record time")
    ingest_history_days: int = Field(
        30, ge=1, description="ingest_state history (resuming reads ingest_latest)"
    )


# Cluster mode: each replicated table's Keeper path and replica name, macros each node
# expands. The path must be a table's own whatever its name ({uuid}, which ON CLUSTER makes
# one value on every node; ClickHouse's own default): migrations create a copy under a second
# name and EXCHANGE the two, and ClickHouse fixes {database} and {table} into a path when a
# table is created, so a name-based path would move with the swapped table and a later copy
# under that name would find its path taken.
DEFAULT_REPLICA_PATH = "/clickhouse/tables/{uuid}/{shard}"
DEFAULT_REPLICA_NAME = "{replica}"
_CLUSTER_NAME = re.compile(r"^(?:\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z0-9_][A-Za-z0-9_.-]{0,99})$")
_MACRO = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


class ClickHouseConfig(_Frozen):
    backend: Literal["chdb", "server"] = "chdb"
    chdb_path: Path = Path(".data/chdb")
    host: str = "127.0.0.1"
    port: int = 8123
    username: str = "default"
    password: SecretStr = SecretStr("")
    database: str = Field("usage", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    secure: bool = False
    fsync_after_insert: bool = Field(
        True,
        description="fsync each insert's part and directory before the insert returns "
        "(durable through a host crash; slower inserts, one per table a batch: "
        "docs/operations.md); set on every MergeTree table at start",
    )
    cluster: str | None = Field(
        None,
        description="a ClickHouse cluster (remote_servers name or a macro like {cluster}): "
        "migrations run ON CLUSTER and every table is Replicated*; None = one server",
    )
    replica_path: str = Field(
        DEFAULT_REPLICA_PATH, description="cluster mode: each table's Keeper path; holds {uuid}"
    )
    replica_name: str = Field(
        DEFAULT_REPLICA_NAME, description="cluster mode: the replica's name, a macro per node"
    )

    @model_validator(mode="after")
    def _check(self) -> ClickHouseConfig:
        if self.cluster is None:
            return self
        if not _CLUSTER_NAME.match(self.cluster):
            raise ValueError(
                "cluster must be a cluster name from the servers' remote_servers (letters, "
                "digits, _ . -) or one macro such as {cluster}"
            )
        if self.backend != "server":
            raise ValueError("cluster mode needs backend: server (chDB runs no distributed DDL)")
        if not self.replica_path.startswith("/") or "{uuid}" not in self.replica_path:
            raise ValueError(
                "replica_path must be an absolute Keeper path holding {uuid}: migrations swap "
                "tables by name (EXCHANGE TABLES), so a path must belong to a table, not a name"
            )
        if not _MACRO.search(self.replica_name):
            raise ValueError(
                "replica_name must hold a macro (such as {replica}) that each node sets to "
                "its own name: one literal name would be every node's"
            )
        return self

    retention: RetentionConfig = RetentionConfig()


_ACCOUNT = re.compile(r"^acct_[A-Za-z0-9]{1,64}$")


class StripeConfig(_Frozen):
    enabled: bool = True
    api_key: SecretStr | None = None
    api_base: str = "https://api.stripe.com"
    meter_events_base: str = "https://meter-events.stripe.com"
    max_events_per_request: int = Field(100, ge=1, le=100)
    requests_per_second: float = Field(20.0, gt=0, description="below the 25/s sandbox limit")
    concurrency: int = Field(4, ge=1, le=64)
    session_refresh_margin_seconds: float = Field(120.0, ge=0, lt=900)
    max_retries: int = Field(8, ge=0)
    poll_interval_seconds: float = Field(0.5, gt=0)
    lookback_days: int = Field(35, ge=1, le=35)
    verify_after_hours: float = Field(
        20.0, gt=1, lt=24, description="unknown outcomes older than this are checked, not re-sent"
    )
    verify_settle_seconds: float = Field(
        3600.0, ge=0, le=3 * 3600, description="how long event summaries may lag a delivery"
    )
    pending_age_alert_days: float = Field(30.0, gt=0, le=35)
    invoice_grace_period_seconds: int = Field(
        3600,
        ge=0,
        le=72 * 3600,
        description="Stripe's invoice finalization grace period, an account setting (Dashboard: "
        "Settings > Billing > Invoices; Stripe's default 1 h, at most 72 h): late usage must "
        "reach Stripe within it (`doctor` checks)",
    )
    past_limit_policy: Literal["hold", "redate"] = "hold"
    past_limit_margin_seconds: float = Field(
        3600.0, ge=0, le=86400, description="kept inside Stripe's 35-day timestamp limit"
    )
    error_report_interval_seconds: float = Field(60.0, ge=0)
    period_anchor: datetime | None = Field(
        None, description="a billing-period boundary (UTC, whole minute); buckets are cut there"
    )
    period: Literal["month", "week", "day"] = "month"
    verify_meters: bool = Field(
        True, description="check at start that Stripe holds the billed meters as configured"
    )
    account_property: str | None = Field(
        None,
        min_length=1,
        description="Connect: the event property naming the tenant (its connected account)",
    )
    accounts: dict[str, str] = Field(
        default_factory=dict, description="Connect: tenant -> acct_ id; empty = the property is one"
    )

    @model_validator(mode="after")
    def _check(self) -> StripeConfig:
        bad = sorted(t for t, a in self.accounts.items() if not _ACCOUNT.match(a))
        if bad:
            raise ValueError(f"accounts: not a connected account id (acct_...) for {bad}")
        if self.accounts and self.account_property is None:
            raise ValueError("accounts needs account_property: the event property naming a tenant")
        if self.verify_after_hours * 3600 - self.verify_settle_seconds < 3600:
            raise ValueError("verify_after_hours must exceed verify_settle_seconds by an hour")
        a = self.period_anchor
        if a is not None and (a.tzinfo is None or a.second or a.microsecond):
            raise ValueError(
                "period_anchor must be a whole minute with a time zone (e.g. "
                "2026-01-01T00:00:00Z): usage is windowed by the minute"
            )
        return self


class PipelineConfig(_Frozen):
    batch_max_messages: int = Field(200_000, ge=1)
    batch_max_seconds: float = Field(0.5, gt=0)
    dedup_window_seconds: int = Field(
        6 * 3600,
        ge=60,
        description="dedup horizon: copies of an id this far apart in event time are one event",
    )
    future_tolerance_seconds: int = Field(300, ge=0)
    max_invalid_ratio: float = Field(
        0.5, gt=0, le=1, description="stop above this dead-letter share"
    )
    invalid_ratio_min_messages: int = Field(1000, ge=1, description="...of a range this large")
    max_past_days: int = Field(35, ge=1)
    poison_after_attempts: int = Field(
        3,
        ge=2,
        description="crashes on one range before it is split to find a poison message; "
        "unanswered sends of one Stripe push before it is quarantined",
    )
    rollup_threads: int = Field(
        1,
        ge=0,
        description="ClickHouse threads a window recompute may use (0: ClickHouse's own "
        "default); one leaves the consume loop a core of its own on a small embedded host",
    )
    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(9108, ge=0, le=65535)
    stall_seconds: float = Field(
        60.0,
        ge=5,
        description="/healthz fails once the consume loop, rollup or emitter, busy, has made "
        "no progress this long (retries during an outage count as progress)",
    )


def default_meters() -> list[MeterConfig]:
    """The embedded default: the demo's three meters, both emission modes."""
    return [
        MeterConfig(
            name="api_calls",
            event_name="api_call",
            aggregation="sum",
            stripe_event_name="api_calls",
            emission="aggregated",
        ),
        MeterConfig(
            name="tokens",
            event_name="tokens",
            aggregation="sum",
            stripe_event_name="tokens",
            emission="per_event",
        ),
        MeterConfig(
            name="storage_gb",
            event_name="storage_gb",
            aggregation="last",
            stripe_event_name="storage_gb",
            emission="per_event",
            stripe_value_format="decimal",
        ),
    ]


_SCHEMA_ENV = "usage_consumer_schema"
_STRIPE_ONLY = {
    "stripe_value_format",
    "stripe_formula",
    "stripe_event_time_window",
    "stripe_customer_key",
    "stripe_value_key",
}


class LogConfig(_Frozen):
    format: Literal["text", "json"] = Field(
        "text", description="json: one object a line (time, level, logger, message)"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="USAGE_CONSUMER_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    kafka: KafkaConfig = KafkaConfig()
    # `schema` shadows a BaseModel attribute. An alias is also the env name, unprefixed, so
    # the alias carries the prefix; files and overrides say `schema` (see load_settings).
    schema_: SchemaConfig = Field(SchemaConfig(), validation_alias=_SCHEMA_ENV)
    clickhouse: ClickHouseConfig = ClickHouseConfig()
    stripe: StripeConfig = StripeConfig()
    pipeline: PipelineConfig = PipelineConfig()
    log: LogConfig = LogConfig()
    meters: list[MeterConfig] = Field(default_factory=default_meters, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        for field in ("name", "event_name"):
            seen = [getattr(m, field) for m in self.meters]
            dupes = sorted({v for v in seen if seen.count(v) > 1})
            if dupes:
                raise ValueError(f"meters: {field} must be unique, repeated: {', '.join(dupes)}")
        kept = self.clickhouse.retention.ledger_days
        need = LEDGER_MIN_DAYS + self.pipeline.max_past_days
        if kept and kept < need:
            raise ValueError(
                f"clickhouse.retention.ledger_days must be 0 (keep) or at least {need}: a cancel "
                f"may take back usage {LEDGER_MIN_DAYS - 1} days older than itself, and events "
                f"are accepted up to pipeline.max_past_days ({self.pipeline.max_past_days}) old"
            )
        longest = max(m.allowed_lateness_seconds for m in self.meters)
        if self.pipeline.dedup_window_seconds < longest:
            raise ValueError(
                "pipeline.dedup_window_seconds must cover the longest allowed lateness"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the YAML file (passed as init kwargs), so a Secret can override it.
        return env_settings, init_settings, file_secret_settings

    def meter_for_event(self) -> dict[str, MeterConfig]:
        return {m.event_name: m for m in self.meters}

    def classification_body(self) -> str:
        """What classification depends on, as canonical JSON; kept per hash (P1). How a
        meter reaches Stripe after the outbox (formula, payload keys, value format) is not
        part of it: changing those never re-classifies a range."""
        p = self.pipeline
        return json.dumps(
            {
                "meters": [m.model_dump(mode="json", exclude=_STRIPE_ONLY) for m in self.meters],
                "future_tolerance_seconds": p.future_tolerance_seconds,
                "max_past_days": p.max_past_days,
            },
            sort_keys=True,
        )

    def config_hash(self) -> str:
        """Hash of the classification body; stored in every range intent (P1)."""
        return hashlib.sha256(self.classification_body().encode()).hexdigest()[:16]


def parse_classification(body: str) -> tuple[list[MeterConfig], int, int]:
    """Meters, future tolerance and past window from a stored classification body."""
    d = json.loads(body)
    meters = [MeterConfig.model_validate(m) for m in d["meters"]]
    return meters, int(d["future_tolerance_seconds"]), int(d["max_past_days"])


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ["schema" if p == _SCHEMA_ENV else str(p) for p in err["loc"]]
        path = ".".join(loc) or "config"
        lines.append(f"{path}: {err['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from an optional YAML file, the environment, and explicit overrides."""
    data: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text())
        except OSError as exc:
            raise ConfigError(f"config file {config_file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {config_file}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file}: top level must be a mapping")
        data.update(loaded or {})
    data.update(overrides)
    if "schema" in data:
        data[_SCHEMA_ENV] = data.pop("schema")
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
