from pathlib import Path

import pytest

from consumer.config import ConfigError, MeterConfig, Settings, load_settings


def test_defaults_give_three_meters_in_both_modes() -> None:
    s = load_settings()
    assert [m.name for m in s.meters] == ["api_calls", "tokens", "storage_gb"]
    assert {m.emission for m in s.meters} == {"aggregated", "per_event"}


def test_yaml_file_and_environment_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "kafka:\n  topic: from-yaml\n  librdkafka:\n    fetch.min.bytes: '1024'\n"
        "meters:\n  - {name: gb, event_name: gb, aggregation: max}\n"
    )
    monkeypatch.setenv("USAGE_CONSUMER_KAFKA__GROUP_ID", "from-env")
    s = load_settings(f)
    assert s.kafka.topic == "from-yaml"
    assert s.kafka.group_id == "from-env"
    assert s.kafka.librdkafka == {"fetch.min.bytes": "1024"}
    assert s.meters[0].aggregation == "max"


def test_schema_section_from_the_prefixed_environment_and_from_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USAGE_CONSUMER_SCHEMA__REGISTRY_URL", "http://registry:8081")
    monkeypatch.setenv("USAGE_CONSUMER_SCHEMA__REGISTRY_PASSWORD", "pw")
    monkeypatch.setenv("SCHEMA__REGISTRY_USERNAME", "not-ours")  # unprefixed: ignored
    s = load_settings()
    assert s.schema_.registry_url == "http://registry:8081"
    assert s.schema_.registry_password is not None
    assert s.schema_.registry_password.get_secret_value() == "pw"
    assert s.schema_.registry_username is None
    f = tmp_path / "c.yaml"
    f.write_text("schema:\n  mode: plain\n")
    with pytest.raises(ConfigError, match=r"schema: .*plain_writer_schema"):
        load_settings(f)


def test_error_names_field_and_problem() -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(meters=[{"name": "x", "event_name": "x", "aggregation": "median"}])
    assert "meters.0.aggregation" in str(e.value)


def test_clickhouse_only_aggregation_cannot_bill() -> None:
    with pytest.raises(ConfigError, match="ClickHouse-only"):
        load_settings(
            meters=[
                {"name": "m", "event_name": "m", "aggregation": "max", "stripe_event_name": "m"}
            ]
        )


def test_aggregated_emission_needs_a_sum() -> None:
    with pytest.raises(ConfigError, match="per_event"):
        load_settings(
            meters=[
                {
                    "name": "m",
                    "event_name": "m",
                    "aggregation": "last",
                    "stripe_event_name": "m",
                    "emission": "aggregated",
                }
            ]
        )


def test_duplicate_event_names_rejected() -> None:
    m = {"name": "a", "event_name": "e"}
    with pytest.raises(ConfigError, match="event_name must be unique"):
        load_settings(meters=[m, {**m, "name": "b"}])


def test_window_must_be_whole_minutes() -> None:
    with pytest.raises(ConfigError, match="window_seconds"):
        load_settings(meters=[{"name": "a", "event_name": "e", "window_seconds": 90}])


def test_secret_never_in_error_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USAGE_CONSUMER_CLICKHOUSE__PASSWORD", "hunter2-secret")
    monkeypatch.setenv("USAGE_CONSUMER_CLICKHOUSE__PORT", "not-a-port")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert "clickhouse.port" in str(e.value)
    assert "hunter2" not in str(e.value)
    monkeypatch.delenv("USAGE_CONSUMER_CLICKHOUSE__PORT")
    assert "hunter2" not in repr(load_settings())


def test_bad_yaml_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("kafka: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(f)
    with pytest.raises(ConfigError, match="No such file"):
        load_settings(tmp_path / "missing.yaml")


def test_config_hash_changes_with_meters() -> None:
    a = load_settings()
    b = load_settings(meters=[MeterConfig(name="x", event_name="x").model_dump()])
    assert a.config_hash() == Settings().config_hash()
    assert a.config_hash() != b.config_hash()


def meter_config(**fields: object) -> MeterConfig:
    base: dict[str, object] = {"name": "m", "event_name": "e", "stripe_event_name": "s"}
    return MeterConfig.model_validate({**base, **fields})


def test_the_stripe_formula_follows_emission_and_aggregation() -> None:
    assert meter_config(aggregation="count").formula == "sum"  # aggregated counts are sums
    assert meter_config(aggregation="count", emission="per_event").formula == "count"
    assert meter_config(aggregation="last", emission="per_event").formula == "last"


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"aggregation": "count", "stripe_formula": "count"}, "needs a Stripe sum meter"),
        ({"emission": "per_event", "stripe_formula": "last"}, "not last"),
        ({"stripe_event_time_window": "hour"}, "cannot take partial sums"),
        ({"aggregation": "avg"}, "ClickHouse-only"),
        ({"aggregation": "last"}, "only a sum"),
    ],
)
def test_meter_semantics_are_checked_at_load(fields: dict[str, object], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        meter_config(**fields)


def test_a_pre_aggregated_last_meter_is_allowed() -> None:
    m = meter_config(aggregation="last", emission="per_event", stripe_event_time_window="day")
    assert m.formula == "last" and m.stripe_event_time_window == "day"


def test_how_usage_reaches_stripe_never_changes_the_classification_hash() -> None:
    base = load_settings()
    meters = [m.model_dump() for m in base.meters]
    meters[0] |= {"stripe_customer_key": "customer", "stripe_value_format": "decimal"}
    assert load_settings(meters=meters).config_hash() == base.config_hash()
    meters[0] |= {"allowed_lateness_seconds": 60}
    assert load_settings(meters=meters).config_hash() != base.config_hash()
