"""Classify a range: each event accepted, duplicate, late or invalid, decided from the
records and the range's snapshot only (P1), with one ledger question for the batch."""
