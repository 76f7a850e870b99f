"""The consume loop: Kafka assignment and polling, forming each partition's next range, and
the turn on the store's ledger that instances of one process share."""
