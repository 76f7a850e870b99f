"""Where a batch's results go: the ledger and outbox writes, the side-output topics, and the
window rollup that recomputes minute windows from the ledger."""
