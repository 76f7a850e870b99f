"""Stripe Connect's account lookup reads `customer_tenants` (migration 19) by key, not the
ledger: on random ledgers it places every customer as grouping the ledger did (a model in
Python of the rows written), ledger rows from before the table or written while no
property was kept are copied in once, and over 1,000,000 ledger rows the lookup passes
ClickHouse's `max_rows_to_read` where grouping the ledger is refused."""

from __future__ import annotations

from decimal import Decimal

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.config import StripeConfig
from consumer.emitter.plan.accounts import AccountResolver, account_for
from consumer.emitter.plan.outbox import Push
from consumer.records import DECIMAL, TIME_MS
from consumer.store import tenants
from consumer.store.backend import Backend

pytestmark = pytest.mark.integration
NOW = 1_790_000_000_000
ACCOUNTS = {"acme": "acct_1", "globex": "acct_2"}
Event = tuple[str, str, str]  # meter, customer, tenant ('' = the property is missing)


@pytest.fixture
def store(migrated_store: Backend) -> Backend:
    return migrated_store


def ledger_rows(events: list[Event], start: int) -> pa.Table:
    n = len(events)
    return pa.table(
        {
            "meter": pa.array([m for m, _, _ in events]),
            "customer_id": pa.array([c for _, c, _ in events]),
            "event_id": pa.array([f"e{start + i}" for i in range(n)]),
            "event_time": pa.array([NOW + i for i in range(n)], TIME_MS),
            "value": pa.array([Decimal(1)] * n, DECIMAL),
            "properties": pa.array(
                [[("tenant", t)] if t else [] for _, _, t in events],
                pa.map_(pa.string(), pa.string()),
            ),
            "ver": pa.array([1] * n, pa.uint64()),
        }
    )


def write_ledger(store: Backend, events: list[Event], start: int, prop: str | None) -> None:
    """A batch as the sink writes it: its tenants (when a property is kept), then the ledger."""
    table = ledger_rows(events, start)
    tenants.write(store, prop, table)
    store.insert_columns("usage_events", dict(zip(table.column_names, table.columns, strict=True)))


def pushes(keys: set[tuple[str, str]]) -> list[Push]:
    return [Push(f"{m}/{c}", "per_event", m, m, c, NOW, 0, Decimal(1), 0) for m, c in keys]


events = st.lists(
    st.tuples(
        st.sampled_from(["m1", "m2"]),
        st.sampled_from(["c1", "c2", "c3"]),
        st.sampled_from(["", "acme", "globex", "initech", "acct_x"]),
    ),
    max_size=12,
)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(before=events, unkept=events, kept=events, mapped=st.booleans())
def test_accounts_are_placed_as_the_ledger_names_them(
    store: Backend, before: list[Event], unkept: list[Event], kept: list[Event], mapped: bool
) -> None:
    for table in ("usage_events", "customer_tenants", "customer_tenants_complete"):
        store.command(f"TRUNCATE TABLE {table}")
    write_ledger(store, before, 0, None)  # before migration 19: no tenants kept
    config = StripeConfig(account_property="tenant", accounts=ACCOUNTS if mapped else {})
    AccountResolver(store, config).resolve(pushes({("m1", "c1")}))  # a first process
    tenants.ensure(store, None)  # a process that keeps no property writes some
    write_ledger(store, unkept, 100, None)
    tenants.ensure(store, "tenant")  # the next one keeping it again starts
    write_ledger(store, kept, 200, "tenant")
    ledger = before + unkept + kept
    keys = {(m, c) for m, c, _ in ledger} | {("m1", "nobody")}
    named = {k: sorted({t for m, c, t in ledger if (m, c) == k}) for k in keys}
    want = {k: account_for(named[k], ACCOUNTS if mapped else {}) for k in keys}
    assert AccountResolver(store, config).resolve(pushes(keys)) == want
    # error reports are read in every account a push can be placed in
    placed = {a for a in want.values() if isinstance(a, str) and a}
    assert placed <= set(tenants.accounts(store, "tenant", config.accounts))


def test_the_lookup_reads_the_customers_not_the_ledger(store: Backend) -> None:
    store.command(
        f"""INSERT INTO usage_events (meter, customer_id, event_id, event_time, value,
                                       properties, topic, partition, offset, record_time, ver)
            SELECT 'm', concat('c', toString(number % 50000)), toString(number),
                   fromUnixTimestamp64Milli({NOW} - number * 1000, 'UTC'), 1,
                   map('tenant', if(number % 50000 = 7, 'globex', 'acme')), 't', 1, number,
                   now64(3), 1
            FROM numbers(1000000)"""
    )
    resolver = AccountResolver(store, StripeConfig(account_property="tenant", accounts=ACCOUNTS))
    resolver.resolve(pushes({("m", "c0")}))  # the first lookup copies the ledger's tenants in
    store.command("SET max_rows_to_read = 100000")
    try:
        got = resolver.resolve(pushes({("m", "c1"), ("m", "c7")}))
        assert got == {("m", "c1"): "acct_1", ("m", "c7"): "acct_2"}
        with pytest.raises(Exception, match=r"TOO_MANY_ROWS|[Ll]imit for rows"):
            store.query(  # the lookup before migration 19: the ledger grouped
                """SELECT meter, customer_id, groupUniqArray(properties['tenant'])
                   FROM usage_events WHERE (meter, customer_id) IN [('m', 'c1')]
                   GROUP BY meter, customer_id"""
            )
    finally:
        store.command("SET max_rows_to_read = 0")
