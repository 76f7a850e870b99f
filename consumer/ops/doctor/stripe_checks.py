"""Stripe: the billed meters as configured, the request rate the key allows, and whether
late usage still reaches its invoice within Stripe's finalization grace period."""

from __future__ import annotations

from urllib.parse import urlsplit

from consumer.emitter.send.sender import retry_horizon
from consumer.emitter.send.session import stripe_client
from consumer.emitter.truth.standing import backlog
from consumer.ops import meters_sync
from consumer.ops.doctor.report import Finding, fail, ok, span, warn
from consumer.ops.doctor.runner import Env

SYNC = "run `usage-consumer meters sync`"
# Stripe's request limits (docs.stripe.com/rate-limits): every request of a sandbox key
# shares 25/s; live keys have 100/s for the v1 API and 10,000/s on the meter event stream.
TEST_LIMIT, LIVE_BASIC_LIMIT, LIVE_STREAM_LIMIT = 25.0, 100.0, 10_000.0
GRACE_WHERE = (
    "Stripe Dashboard, Settings > Billing > Invoices, 'Invoice finalization grace period' "
    "(default 1 hour, at most 72)"
)


def meters(env: Env) -> list[Finding]:
    """Every billed meter exists at Stripe, active, with the configured event name, formula,
    customer mapping and value key; with Connect, in every connected account. Reads what
    `meters sync` reads (ops/meters_sync.plan) and changes nothing."""
    s = env.settings.stripe
    billed = [m for m in env.settings.meters if m.stripe_event_name]
    if not s.enabled or not billed:
        return [ok("stripe meters", "nothing billed (stripe disabled or no stripe_event_name)")]
    if s.api_key is None:
        return [
            fail("stripe meters", "stripe.api_key is not set", "set USAGE_CONSUMER_STRIPE__API_KEY")
        ]
    api = stripe_client(s.api_key.get_secret_value(), {"api": s.api_base}, env.timeout)
    by_name = {m.name: m for m in billed}
    out = []
    for a in meters_sync.plan(api, billed, meters_sync.accounts_of(s)):
        where = f" in {a.account}" if a.account else ""
        check = f"meter {a.meter}{where}"
        if a.action == "ok":
            m = by_name[a.meter]
            shape = f"{m.formula}, keys {m.stripe_customer_key}/{m.stripe_value_key}"
            out.append(ok(check, f"{a.stripe_id} active: event {a.event_name}, {shape}"))
        elif a.action == "create":
            detail = f"Stripe has no meter for event name {a.event_name!r}"
            out.append(fail(check, detail, f"{SYNC} (creates it)"))
        elif a.action == "reactivate":
            detail = f"{a.stripe_id} (event {a.event_name}) is inactive"
            out.append(fail(check, detail, f"{SYNC} (reactivates it)"))
        else:
            out.append(
                fail(
                    check,
                    f"{a.stripe_id} (event {a.event_name}): {a.detail}",
                    "Stripe cannot change a meter's formula or keys: bill through a meter "
                    "made as configured (a new stripe_event_name, then `meters sync`), or "
                    "configure this meter as Stripe holds it",
                )
            )
    return out


def _on_stripe(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host == "stripe.com" or host.endswith(".stripe.com")


def request_rate(env: Env) -> list[Finding]:
    """stripe.requests_per_second paces every request the emitter makes (stream sends,
    meters, event summaries): it must fit the limit of the key's mode."""
    s = env.settings.stripe
    name, rate = "stripe rate", s.requests_per_second
    if not s.enabled:
        return [ok(name, "stripe disabled")]
    bases = [s.api_base, s.meter_events_base]
    if not any(_on_stripe(b) for b in bases):
        return [ok(name, f"{rate:g}/s to {s.api_base}: not Stripe, no Stripe limit applies")]
    key = s.api_key.get_secret_value() if s.api_key else ""
    lower = f"set stripe.requests_per_second to at most {{:g}} (now {rate:g})"
    if key.startswith(("sk_test_", "rk_test_")):
        if rate > TEST_LIMIT:
            detail = f"{rate:g}/s with a test-mode key: Stripe answers 429 past {TEST_LIMIT:g}/s"
            return [fail(name, detail, lower.format(TEST_LIMIT))]
        return [ok(name, f"{rate:g}/s, within the test-mode limit of {TEST_LIMIT:g}/s")]
    if key.startswith(("sk_live_", "rk_live_")):
        if rate > LIVE_STREAM_LIMIT:
            detail = f"{rate:g}/s: past the stream's live limit of {LIVE_STREAM_LIMIT:g}/s"
            return [fail(name, detail, lower.format(LIVE_STREAM_LIMIT))]
        if rate > LIVE_BASIC_LIMIT:
            detail = (
                f"{rate:g}/s: meters and event summaries share this pace, and Stripe limits "
                f"them to {LIVE_BASIC_LIMIT:g}/s in live mode"
            )
            return [warn(name, detail, lower.format(LIVE_BASIC_LIMIT))]
        return [ok(name, f"{rate:g}/s, within the live-mode limit of {LIVE_BASIC_LIMIT:g}/s")]
    return [
        warn(
            name,
            "the key's mode is not known from its prefix (sk_test_, sk_live_, rk_test_, rk_live_)",
            "use a secret or restricted key of Stripe's",
        )
    ]


def invoice_grace(env: Env) -> list[Finding]:
    """Usage accepted late (up to the longest allowed lateness), plus the longest a request
    retries before its push waits for the next cycle, plus how long the oldest push has
    already waited in the outbox, must reach Stripe before the invoice of its period
    finalizes: Stripe finalizes `invoice_grace_period_seconds` after the period ends."""
    s, name = env.settings.stripe, "invoice grace"
    billed = [m for m in env.settings.meters if m.stripe_event_name]
    if not s.enabled or not billed:
        return [ok(name, "nothing billed")]
    grace = s.invoice_grace_period_seconds
    late = max(billed, key=lambda m: m.allowed_lateness_seconds)
    lateness = late.allowed_lateness_seconds
    retries = retry_horizon(s.max_retries) + s.poll_interval_seconds
    waited, seen = _outbox_age(env)
    total = lateness + retries + waited
    detail = (
        f"lateness {span(lateness)} ({late.name}) + retries {span(retries)} + {seen} = "
        f"{span(total)} of a {span(grace)} grace period"
    )
    fix = (
        f"lower {late.name}'s allowed_lateness_seconds to at most "
        f"{max(0, int(grace - retries - waited))}, or lengthen the grace period at Stripe "
        f"({GRACE_WHERE}) and set stripe.invoice_grace_period_seconds to it"
    )
    if waited >= grace:
        behind = (
            "get sending going again (docs/operations.md, UsageConsumerStripeBacklog), and "
            f"near a period's end lengthen the grace period at Stripe ({GRACE_WHERE})"
        )
        return [fail(name, detail + ": the outbox is older than the grace period", behind)]
    if lateness > grace:
        return [fail(name, detail + ": late usage misses its invoice", fix)]
    if total > grace:
        return [warn(name, detail + ": the latest usage may miss its invoice", fix)]
    return [ok(name, detail)]


def _outbox_age(env: Env) -> tuple[float, str]:
    """Seconds the oldest awaiting push has waited (the pending-age gauge's measure), and
    how it reads; 0 when the outbox cannot be read (the clickhouse row says why)."""
    try:
        store = env.store(env.timeout / 2)  # the clickhouse row waits the whole timeout
        if not store.query("EXISTS TABLE stripe_open")[0][0]:
            return 0.0, "backlog 0s (no outbox yet)"
        b = backlog(store, 0)
    except Exception as exc:
        return 0.0, f"backlog unknown ({type(exc).__name__}: see the clickhouse row)"
    if not b.pending:
        return 0.0, "backlog 0s"
    waited = max(0.0, env.clock.now() - b.oldest_ms / 1000)
    return waited, f"backlog {span(waited)} ({b.pending} pushes)"
