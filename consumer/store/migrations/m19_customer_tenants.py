"""Migration 19: the tenants each customer's events named, for Stripe Connect."""

from __future__ import annotations

from consumer.store.migrations._sql import Step

# Read by key when a push is first attempted (consumer/store/tenants.py), instead of
# grouping the ledger. Filled from the ledger by the first process that keeps a property:
# the property lives in the configuration, which a migration does not know.
NUMBER = 19
NAME = "customer tenants"
STEPS: list[Step] = [
    """CREATE TABLE IF NOT EXISTS customer_tenants (
        property String,
        meter LowCardinality(String),
        customer_id String,
        tenant String
    ) ENGINE = ReplacingMergeTree
    ORDER BY (property, meter, customer_id, tenant)""",
    """CREATE TABLE IF NOT EXISTS customer_tenants_complete (
        property String,
        written_at DateTime64(3, 'UTC') DEFAULT now64(3)
    ) ENGINE = MergeTree
    ORDER BY written_at""",
]
