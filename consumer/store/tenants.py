"""Which tenants each (meter, customer)'s events named: what Stripe Connect bills by.

The emitter places a customer's pushes in the connected account of the one tenant its
events name (consumer/emitter/plan/accounts.py). Grouping the ledger for that read every
event the customer ever sent; `customer_tenants` (migration 19) keeps one row per
(property, meter, customer, tenant) instead, read by key. The sink writes a range's rows
before its ledger rows, so every ledger row's tenant is there. Ledger rows written while no
process kept the property (before the migration, or under another `account_property`) are
copied in once by `ensure`, which the process runs before it writes or reads any.
"""

from __future__ import annotations

import pyarrow as pa

from consumer.store.backend import Backend

# The property whose tenants `customer_tenants` holds for every ledger row ('' = none).
_COMPLETE = "SELECT argMax(property, written_at) FROM customer_tenants_complete"


def ensure(store: Backend, prop: str | None) -> None:
    """Make `customer_tenants` complete for `prop` (None: record that nothing is kept, so a
    later process keeping a property copies the ledger written meanwhile)."""
    rows = store.query(_COMPLETE)
    complete = str(rows[0][0]) if rows else ""
    if complete == (prop or ""):
        return
    if prop:
        store.command(
            """INSERT INTO customer_tenants (property, meter, customer_id, tenant)
               SELECT DISTINCT {p:String}, meter, customer_id, properties[{p:String}]
               FROM usage_events""",
            {"p": prop},
        )
    store.command(
        "INSERT INTO customer_tenants_complete (property) VALUES ({p:String})", {"p": prop or ""}
    )


def write(store: Backend, prop: str | None, accepted: pa.Table) -> None:
    """The tenants of a batch's accepted events; written before the ledger rows."""
    if not prop or not accepted.num_rows:
        return
    store.command_with(
        """INSERT INTO customer_tenants (property, meter, customer_id, tenant)
           SELECT DISTINCT {p:String}, meter, customer_id, properties[{p:String}]
           FROM $accepted""",
        {"accepted": accepted.select(["meter", "customer_id", "properties"])},
        {"p": prop},
    )


def named(
    store: Backend, prop: str, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], list[str]]:
    """(meter, customer) -> the distinct tenants their events named ('' = none named)."""
    rows = store.query(
        """SELECT meter, customer_id, groupUniqArray(tenant) FROM customer_tenants
           WHERE property = {p:String}
             AND (meter, customer_id) IN {keys:Array(Tuple(String, String))}
           GROUP BY meter, customer_id""",
        {"p": prop, "keys": keys},
    )
    return {(str(m), str(c)): [str(t) for t in ts] for m, c, ts in rows}


def accounts(store: Backend, prop: str | None, mapping: dict[str, str]) -> list[str]:
    """The connected accounts pushes can be placed in (accounts.account_for): the values of
    `mapping`, or without one the tenants named that are account ids. Read from
    `customer_tenants`, whose size follows customers and tenants, not the usage history.
    An account dropped from `mapping` is no longer among them."""
    if not prop:
        return []
    if mapping:
        return sorted(set(mapping.values()))
    rows = store.query(
        """SELECT DISTINCT tenant FROM customer_tenants
           WHERE property = {p:String} AND startsWith(tenant, 'acct_') ORDER BY tenant""",
        {"p": prop},
    )
    return [str(t) for (t,) in rows]
