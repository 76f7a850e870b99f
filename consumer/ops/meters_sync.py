"""Stripe meters as the configuration names them: planned, created, and checked at start.

A meter's event name routes events to it, and only its display name can change on Stripe,
so a meter that exists with another formula, payload key or event time window is a conflict
for a person, never a second meter or a silent rewrite. An inactive meter of the right shape
is reactivated. Running the plan twice changes nothing the second time. With Stripe Connect
every connected account in `stripe.accounts` needs its own meters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import stripe

from consumer.config import MeterConfig, StripeConfig
from consumer.ops.totals import format_table


class MeterMismatch(Exception):
    """A billed meter Stripe does not hold as configured; sending would bill wrongly."""


@dataclass(frozen=True)
class Action:
    meter: str
    event_name: str
    account: str  # "" = the platform
    action: str  # ok, create, reactivate, conflict
    detail: str = ""
    stripe_id: str = ""


def wanted(m: MeterConfig) -> dict[str, Any]:
    """The create parameters of `m`'s Stripe meter."""
    params: dict[str, Any] = {
        "display_name": m.name,
        "event_name": m.stripe_event_name,
        "default_aggregation": {"formula": m.formula},
        "customer_mapping": {"type": "by_id", "event_payload_key": m.stripe_customer_key},
        "value_settings": {"event_payload_key": m.stripe_value_key},
    }
    if m.stripe_event_time_window:
        params["event_time_window"] = m.stripe_event_time_window
    return params


def differences(m: MeterConfig, found: Any) -> list[str]:
    """How Stripe's meter `found` differs from what `m` needs."""
    pairs = [
        ("formula", m.formula, found.default_aggregation.formula),
        ("customer key", m.stripe_customer_key, found.customer_mapping.event_payload_key),
        ("value key", m.stripe_value_key, _value_key(found)),
        ("event_time_window", m.stripe_event_time_window, found.event_time_window),
    ]
    return [
        f"{what} is {have!r}, configured {want!r}" for what, want, have in pairs if want != have
    ]


def _value_key(found: Any) -> str | None:
    settings = getattr(found, "value_settings", None)
    return getattr(settings, "event_payload_key", None) if settings else None


def accounts_of(config: StripeConfig) -> list[str]:
    """Where meters must exist: the platform, or each configured connected account."""
    return sorted(set(config.accounts.values())) if config.account_property else [""]


def _opts(account: str) -> Any:
    return {"stripe_account": account} if account else None


def plan(
    api: stripe.StripeClient,
    meters: Sequence[MeterConfig],
    accounts: Sequence[str],
    pace: Callable[[], object] = lambda: None,
) -> list[Action]:
    """What it takes for Stripe to hold every billed meter, per account."""
    out = []
    for account in accounts:
        pace()
        listing = api.v1.billing.meters.list({"limit": 100}, _opts(account))
        by_name: dict[str, list[Any]] = {}
        for found in listing.auto_paging_iter():
            by_name.setdefault(found.event_name, []).append(found)
        for m in meters:
            if m.stripe_event_name:
                out.append(_decide(m, by_name.get(m.stripe_event_name, []), account))
    return out


def _decide(m: MeterConfig, found: list[Any], account: str) -> Action:
    name = m.stripe_event_name or ""
    if not found:
        return Action(m.name, name, account, "create")
    active = [f for f in found if f.status == "active"] or found
    meter = active[0]
    diff = differences(m, meter)
    if diff:
        return Action(m.name, name, account, "conflict", "; ".join(diff), meter.id)
    if meter.status != "active":
        return Action(m.name, name, account, "reactivate", "inactive", meter.id)
    return Action(m.name, name, account, "ok", "", meter.id)


def apply(
    api: stripe.StripeClient,
    actions: Sequence[Action],
    meters: Sequence[MeterConfig],
    pace: Callable[[], object] = lambda: None,
) -> list[Action]:
    """Carry out creates and reactivations; returns the actions with Stripe's ids."""
    by_name = {m.name: m for m in meters}
    done = []
    for a in actions:
        pace()
        if a.action == "create":
            params: Any = wanted(by_name[a.meter])
            made = api.v1.billing.meters.create(params, _opts(a.account))
            a = Action(a.meter, a.event_name, a.account, "created", "", made.id)
        elif a.action == "reactivate":
            api.v1.billing.meters.reactivate(a.stripe_id, None, _opts(a.account))
            a = Action(a.meter, a.event_name, a.account, "reactivated", "", a.stripe_id)
        done.append(a)
    return done


def format_plan(actions: Sequence[Action]) -> str:
    rows = [
        [a.meter, a.event_name, a.account or "(platform)", a.action, a.stripe_id, a.detail]
        for a in actions
    ]
    return format_table(["meter", "event name", "account", "action", "stripe id", "detail"], rows)


def verify(
    api: stripe.StripeClient,
    meters: Sequence[MeterConfig],
    config: StripeConfig,
    pace: Callable[[], object] = lambda: None,
) -> None:
    """Raise MeterMismatch unless Stripe holds every billed meter, active, as configured."""
    wrong = [a for a in plan(api, meters, accounts_of(config), pace) if a.action != "ok"]
    if wrong:
        lines = [
            f"{a.meter} ({a.event_name}{' in ' + a.account if a.account else ''}): "
            + {"create": "no such Stripe meter", "reactivate": "the Stripe meter is inactive"}.get(
                a.action, a.detail
            )
            for a in wrong
        ]
        raise MeterMismatch(
            "Stripe does not hold the configured meters; run `usage-consumer meters sync` "
            "(conflicts need a person): " + "; ".join(lines)
        )
