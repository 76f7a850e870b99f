"""usage-consumer: exactly-once usage events from Kafka to ClickHouse aggregates and Stripe."""
