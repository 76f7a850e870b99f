"""Migration 9: stripe amounts sent, bucket ends and connected accounts."""

from __future__ import annotations

from consumer.store.migrations._sql import Step

NUMBER = 9
NAME = "stripe amounts sent, bucket ends and connected accounts"
STEPS: list[Step] = [
    # What a push's first send carried (whole numbers carry fractions between pushes,
    # consumer/emitter/plan/units.py); NULL for rows sent exactly before it was recorded.
    """ALTER TABLE stripe_pushes ADD COLUMN IF NOT EXISTS
        sent_value Nullable(Decimal(38, 9)) DEFAULT NULL""",
    # Where an aggregated bucket ends (cut at billing-period anchors); 0 = unknown.
    """ALTER TABLE stripe_pushes ADD COLUMN IF NOT EXISTS
        bucket_end DateTime64(3, 'UTC') DEFAULT toDateTime64(0, 3, 'UTC')""",
    # Stripe Connect: the connected account a push is sent to ('' = the platform).
    "ALTER TABLE stripe_pushes ADD COLUMN IF NOT EXISTS stripe_account String DEFAULT ''",
    # `billed` is what Stripe bills for a sent push; `value` stays the exact usage.
    """CREATE OR REPLACE VIEW stripe_delivery AS
        SELECT identifier, mode, meter, customer_id, bucket_start, stripe_timestamp, value,
               multiIf(status_rank IN (2, 6), 'sent', status_rank = 7, 'rejected',
                       status_rank = 4, 'expired', 'pending') AS status,
               stripe_timestamp != bucket_start AS redated, reason, first_attempt_at, updated_at,
               ifNull(sent_value, value) AS billed
        FROM stripe_pushes FINAL""",
]
