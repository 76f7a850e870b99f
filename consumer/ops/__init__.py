"""What operators run and watch: health and metrics HTTP, totals, reconcile, meters sync."""
