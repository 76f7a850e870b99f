"""`usage-consumer doctor`: a preflight of everything `run` relies on, as a table of checks."""
