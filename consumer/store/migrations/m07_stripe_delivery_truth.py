"""Migration 7: stripe delivery truth."""

from __future__ import annotations

from consumer.store.migrations._sql import Step

NUMBER = 7
NAME = "stripe delivery truth"
STEPS: list[Step] = [
    # The timestamp actually sent (differs from bucket_start only when re-dated inside
    # Stripe's 35-day limit) and why a push was rejected, held, confirmed or re-dated.
    """ALTER TABLE stripe_pushes ADD COLUMN IF NOT EXISTS
        stripe_timestamp DateTime64(3, 'UTC') DEFAULT bucket_start""",
    "ALTER TABLE stripe_pushes ADD COLUMN IF NOT EXISTS reason String DEFAULT ''",
    # Every push with its delivery status by name (ranks: consumer/emitter/plan/outbox.py).
    """CREATE VIEW IF NOT EXISTS stripe_delivery AS
        SELECT identifier, mode, meter, customer_id, bucket_start, stripe_timestamp, value,
               multiIf(status_rank IN (2, 6), 'sent', status_rank = 7, 'rejected',
                       status_rank = 4, 'expired', 'pending') AS status,
               stripe_timestamp != bucket_start AS redated, reason, first_attempt_at, updated_at
        FROM stripe_pushes FINAL""",
]
