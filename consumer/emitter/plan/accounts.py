"""Stripe Connect: which connected account a customer's usage is billed in.

A platform bills each tenant's customers in the tenant's connected account (the
`Stripe-Account` header). Events name their tenant in a property (`stripe.account_property`);
`stripe.accounts` maps tenants to `acct_` ids, or, left empty, the property holds the id
itself. A Stripe customer lives in exactly one account, so the account is looked up per
(meter, customer) in the tenants its events named (`customer_tenants`, kept by the sink
beside the ledger and read by key) when a push is first attempted, and kept from then on: a
re-send goes where the first send went. A customer whose events name no tenant, an unknown
one, or two different ones is never guessed: its pushes are held as rejected with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from consumer.config import StripeConfig
from consumer.emitter.plan.outbox import Push
from consumer.store import tenants
from consumer.store.backend import Backend

Key = tuple[str, str]  # (meter, customer)


@dataclass(frozen=True)
class Unbillable:
    """Why a customer's usage cannot go to a connected account."""

    reason: str


def account_for(tenants: Sequence[str], accounts: Mapping[str, str]) -> str | Unbillable:
    """The account of a customer whose events named `tenants` (distinct values)."""
    named = sorted(t for t in tenants if t)
    if len(named) != 1 or len(named) != len(tenants):
        shown = ", ".join(repr(t) if t else "no tenant" for t in sorted(tenants)) or "no tenant"
        return Unbillable(f"one connected account per customer; its events name {shown}")
    tenant = named[0]
    if not accounts:
        if tenant.startswith("acct_"):
            return tenant
        return Unbillable(f"tenant {tenant!r} is not a connected account id (acct_...)")
    if tenant not in accounts:
        return Unbillable(f"tenant {tenant!r} has no connected account in stripe.accounts")
    return accounts[tenant]


class AccountResolver:
    """Looks up the connected account of (meter, customer) pairs; "" without Connect."""

    def __init__(self, store: Backend, config: StripeConfig) -> None:
        self._store = store
        self._property = config.account_property
        self._accounts = dict(config.accounts)
        self._ensured = False

    def resolve(self, pushes: Sequence[Push]) -> dict[Key, str | Unbillable]:
        keys = sorted({(p.meter, p.customer_id) for p in pushes})
        if self._property is None or not keys:
            return {k: "" for k in keys}
        if not self._ensured:  # once a process: ledger rows from before it kept tenants
            tenants.ensure(self._store, self._property)
            self._ensured = True
        seen = tenants.named(self._store, self._property, keys)
        return {k: account_for(seen.get(k, []), self._accounts) for k in keys}
