"""`meters sync` against the emulator through the SDK: created once, idempotent, inactive
meters reactivated, conflicts refused; the emitter sends nothing to a wrong meter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import stripe
import yaml

from consumer.app import build_emitter
from consumer.cli import main
from consumer.clock import ManualClock
from consumer.config import MeterConfig, load_settings
from consumer.emitter.send.sender import SendFailed
from consumer.local.emulator import EmulatorOptions, EmulatorServer, serve
from consumer.metrics import Metrics
from consumer.ops.meters_sync import MeterMismatch, accounts_of, apply, plan, verify
from consumer.store import open_store
from consumer.store.migrations import migrate
from tests.integration.conftest import METERS, STRIPE_KEY

pytestmark = pytest.mark.integration


@pytest.fixture
def emu() -> Iterator[EmulatorServer]:
    server = serve("127.0.0.1", 0, EmulatorOptions())
    yield server
    server.stop()


def client(emu: EmulatorServer) -> stripe.StripeClient:
    return stripe.StripeClient(STRIPE_KEY, base_addresses={"api": emu.url})


def meters(**changes: Any) -> list[MeterConfig]:
    return [MeterConfig.model_validate({**m, **changes.get(str(m["name"]), {})}) for m in METERS]


def config_file(tmp_path: Path, emu: EmulatorServer, **stripe_extra: Any) -> list[str]:
    path = tmp_path / "config.yaml"
    body = {"stripe": {"api_key": STRIPE_KEY, "api_base": emu.url, **stripe_extra}}
    path.write_text(yaml.safe_dump({**body, "meters": METERS}))
    return ["--config", str(path), "meters", "sync"]


def test_sync_creates_once_then_has_nothing_to_do(
    emu: EmulatorServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = config_file(tmp_path, emu)
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count(" create ") == 3 and "meters: would change 3, conflicts 0, of 3" in out
    assert client(emu).v1.billing.meters.list().data == []  # the dry run changed nothing
    assert main(args) == 0
    assert "meters: changed 3" in capsys.readouterr().out
    made = {m.event_name: m for m in client(emu).v1.billing.meters.list().data}
    assert made["storage_gb"].default_aggregation.formula == "last"
    assert made["tokens"].customer_mapping.event_payload_key == "stripe_customer_id"
    assert main(args) == 0  # idempotent
    assert "meters: changed 0, conflicts 0, of 3" in capsys.readouterr().out


def test_an_inactive_meter_is_reactivated_not_duplicated(emu: EmulatorServer) -> None:
    api = client(emu)
    apply(api, plan(api, meters(), [""]), meters())
    tokens = next(m for m in api.v1.billing.meters.list().data if m.event_name == "tokens")
    api.v1.billing.meters.deactivate(tokens.id)
    actions = plan(api, meters(), [""])
    assert [(a.meter, a.action) for a in actions if a.action != "ok"] == [("tokens", "reactivate")]
    with pytest.raises(MeterMismatch, match="inactive"):
        verify(api, meters(), load_settings().stripe)
    apply(api, actions, meters())
    assert api.v1.billing.meters.retrieve(tokens.id).status == "active"
    assert len(api.v1.billing.meters.list({"limit": 100}).data) == 3
    verify(api, meters(), load_settings().stripe)


def test_a_meter_of_another_shape_is_a_conflict_for_a_person(
    emu: EmulatorServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api = client(emu)
    params: Any = {
        "display_name": "tokens",
        "event_name": "tokens",
        "default_aggregation": {"formula": "count"},
        "value_settings": {"event_payload_key": "amount"},
    }
    api.v1.billing.meters.create(params)
    assert main(config_file(tmp_path, emu)) == 1
    out = capsys.readouterr().out
    assert "conflict" in out and "formula is 'count', configured 'sum'" in out
    assert "value key is 'amount', configured 'value'" in out
    assert [m.event_name for m in api.v1.billing.meters.list().data].count("tokens") == 1


def test_meters_are_synced_in_every_connected_account(emu: EmulatorServer) -> None:
    api = client(emu)
    config = load_settings(
        stripe={"account_property": "tenant", "accounts": {"a": "acct_1A", "b": "acct_2B"}}
    ).stripe
    assert accounts_of(config) == ["acct_1A", "acct_2B"]
    apply(api, plan(api, meters(), accounts_of(config)), meters())
    for account in ("acct_1A", "acct_2B"):
        listed = api.v1.billing.meters.list(None, {"stripe_account": account}).data
        assert len(listed) == 3
    assert api.v1.billing.meters.list().data == []  # not the platform's
    verify(api, meters(), config)


def test_the_emitter_sends_nothing_until_stripe_holds_the_meters(
    emu: EmulatorServer, tmp_path: Path
) -> None:
    settings = load_settings(
        clickhouse={"chdb_path": str(tmp_path / "chdb")},
        stripe={"api_key": STRIPE_KEY, "api_base": emu.url, "meter_events_base": emu.url},
        meters=METERS,
    )
    store = open_store(settings.clickhouse)
    migrate(store)
    try:
        emitter = build_emitter(settings, store, ManualClock(0), Metrics())
        with pytest.raises(MeterMismatch, match="no such Stripe meter"):
            emitter.run_once()
        emitter.close()
        api = client(emu)
        apply(api, plan(api, settings.meters, [""]), settings.meters)
        emitter = build_emitter(settings, store, ManualClock(0), Metrics())
        assert emitter.run_once() == 0  # checked, and nothing to send
        emitter.close()
        emu.stop()  # Stripe unreachable at start: retried, not fatal
        emitter = build_emitter(settings, store, ManualClock(0), Metrics())
        with pytest.raises(SendFailed, match="cannot read Stripe's meters yet"):
            emitter.run_once()
        emitter.close()
    finally:
        store.close()
