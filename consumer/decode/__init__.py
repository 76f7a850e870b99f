"""The decode stage: Confluent or plain Avro bytes to columns. The C fast path reads what it
is sure of; fastavro (the reference) decides every other row; the schemas ship in avsc/."""
