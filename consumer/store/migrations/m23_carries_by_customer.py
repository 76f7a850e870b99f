"""Migration 23: the whole-number carry read by customer.

A push in `whole` format sends the floor of its customer's usage assigned so far minus
what was sent (units.py); that carry was read from `stripe_pushes FINAL`, keyed by
identifier, so every read scanned the outbox. The by_bucket projection (migration 21) is
ordered by meter and customer: given the amounts and the first attempt as well, it
answers the carry with the customer's pushes only. The emitter reads a customer's carry
once and keeps it (until a rejection, a cancellation, a failed cycle or a new lease), so
a cycle reads only the customers it has not seen.
"""

from __future__ import annotations

from consumer.store.migrations._sql import Step

NUMBER = 23
NAME = "carries by customer"
STEPS: list[Step] = [
    "ALTER TABLE stripe_pushes DROP PROJECTION IF EXISTS by_bucket SETTINGS mutations_sync = 1",
    """ALTER TABLE stripe_pushes ADD PROJECTION IF NOT EXISTS by_bucket (
        SELECT identifier, mode, meter, customer_id, bucket_start, revision, value,
               status_rank, first_attempt_at, sent_value
        ORDER BY meter, customer_id, bucket_start)""",
    "ALTER TABLE stripe_pushes MATERIALIZE PROJECTION by_bucket SETTINGS mutations_sync = 1",
]
