"""`usage-consumer dlq`: list, show, re-drive and release dead letters."""
