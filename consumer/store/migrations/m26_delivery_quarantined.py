"""Migration 26: `stripe_delivery` says `quarantined` for a push that crashed the emitter.

Such a push is held with the rejected rank (nothing sends it again until a person releases
it) and a reason starting `quarantined:`. Stripe never refused it, and it may even have
reached Stripe before the crash, so `rejected` would mislead whoever reads the view;
`totals`, the reconcile and analysts read the status from here.
"""

from __future__ import annotations

from consumer.store.migrations._sql import Step

NUMBER = 26
NAME = "delivery status quarantined"
STEPS: list[Step] = [
    """CREATE OR REPLACE VIEW stripe_delivery AS
        SELECT identifier, mode, meter, customer_id, bucket_start, stripe_timestamp, value,
               multiIf(status_rank IN (2, 6), 'sent',
                       status_rank = 7 AND startsWith(reason, 'quarantined'), 'quarantined',
                       status_rank = 7, 'rejected',
                       status_rank = 4, 'expired', status_rank = 8, 'cancelled',
                       'pending') AS status,
               stripe_timestamp != bucket_start AS redated, reason, first_attempt_at, updated_at,
               ifNull(sent_value, value) AS billed
        FROM stripe_pushes FINAL""",
]
