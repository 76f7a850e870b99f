"""The Stripe emitter: drains the outbox (stripe_pushes) through the v2 meter event stream."""
