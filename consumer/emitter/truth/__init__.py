"""What Stripe holds: delivery truth, verification against its summaries, pushes grown too
old, error reports, corrections of what was billed, and the alerts on them."""
