"""Stripe Connect: a customer's usage goes to its one connected account, or waits."""

from __future__ import annotations

from decimal import Decimal

import pytest

from consumer.config import StripeConfig
from consumer.emitter.plan.accounts import Unbillable, account_for
from consumer.emitter.plan.outbox import Push
from consumer.emitter.send.dispatch import requests_of

ACCOUNTS = {"acme": "acct_1Acme", "globex": "acct_2Globex"}


def test_a_mapped_tenant_names_its_account() -> None:
    assert account_for(["acme"], ACCOUNTS) == "acct_1Acme"


def test_without_a_mapping_the_property_is_the_account_id() -> None:
    assert account_for(["acct_9Zed"], {}) == "acct_9Zed"
    assert isinstance(account_for(["zed"], {}), Unbillable)


@pytest.mark.parametrize(
    ("tenants", "says"),
    [
        ([], "name no tenant"),
        ([""], "name no tenant"),
        (["acme", ""], "name no tenant, 'acme'"),
        (["acme", "globex"], "name 'acme', 'globex'"),
        (["initech"], "'initech' has no connected account"),
    ],
)
def test_no_single_known_tenant_is_never_guessed(tenants: list[str], says: str) -> None:
    got = account_for(tenants, ACCOUNTS)
    assert isinstance(got, Unbillable) and says in got.reason


def test_account_config_is_checked() -> None:
    with pytest.raises(ValueError, match="not a connected account id"):
        StripeConfig(account_property="tenant", accounts={"acme": "cus_123"})
    with pytest.raises(ValueError, match="needs account_property"):
        StripeConfig(accounts={"acme": "acct_1"})
    assert StripeConfig(account_property="tenant").accounts == {}


def push(i: int, account: str, value: str = "1") -> Push:
    p = Push(f"id{i}", "per_event", "m", "m", "c", i, 0, Decimal(value), 1, account=account)
    return p.moved(p.status, sent=p.value)


def test_a_request_goes_to_one_account_and_holds_at_most_its_events() -> None:
    batch = [push(i, "acct_a" if i % 3 else "") for i in range(10)]
    batch.append(push(10, "acct_a", "1234567890123456"))  # two events
    chunks = requests_of(batch, 3)
    for chunk in chunks:
        assert len({p.account for p in chunk}) == 1
        assert sum(2 if p.identifier == "id10" else 1 for p in chunk) <= 3
    assert sorted(p.identifier for c in chunks for p in c) == sorted(p.identifier for p in batch)
    platform = [p.identifier for c in chunks for p in c if p.account == ""]
    assert platform == ["id0", "id3", "id6", "id9"]  # batch order kept
