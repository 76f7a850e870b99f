"""Stand-ins to run locally, never imported by `usage-consumer run`: the Stripe emulator,
the Tansu broker launcher, the sample generator and the demo."""
