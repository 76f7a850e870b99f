"""The producer helper offered to upstream services.

    from consumer.producer import UsageProducer
    p = UsageProducer({"bootstrap.servers": "kafka:9092"}, topic="usage.events")
    p.send(event_id="req-42", event_name="api_call", customer_id="cus_123",
           value=Decimal("1"), timestamp_ms=1_763_000_000_000)
    p.flush()

It encodes the current schema (v4, or the id it is given) in Confluent framing and keys
every message by `<event_name>/<event_id>`, so all copies of an event land in one
partition and the consumer's per-partition dedup sees them. Delivery is idempotent
(`enable.idempotence`). `cancel()` takes back an event sent earlier.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from confluent_kafka import Producer

from consumer.decode.schemas import LocalSchemaSource
from consumer.decode.wire import encode_confluent

CURRENT_SCHEMA_ID = 4
DeliveryCallback = Callable[[Any, Any], None]


def message_key(event_name: str, event_id: str) -> bytes:
    return f"{event_name}/{event_id}".encode()


def event_record(
    event_id: str,
    event_name: str,
    customer_id: str,
    value: Decimal | int | str,
    timestamp_ms: int,
    properties: Mapping[str, str] | None = None,
    cancels: str = "",
) -> dict[str, Any]:
    """The Avro record for one usage event; values are exact Decimals (9 places at most).
    A record with `cancels` takes back the earlier event of that id (schema v4 on)."""
    record: dict[str, Any] = {
        "event_id": event_id,
        "event_name": event_name,
        "customer_id": customer_id,
        "value": Decimal(value),
        "timestamp": timestamp_ms,
        "properties": dict(properties or {}),
    }
    if cancels:
        record["cancels"] = cancels
    return record


class UsageProducer:
    def __init__(
        self,
        config: Mapping[str, Any],
        topic: str = "usage.events",
        schema_id: int = CURRENT_SCHEMA_ID,
    ) -> None:
        conf = {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 20,
            "compression.type": "lz4",
        }
        conf.update(config)
        self._producer = Producer(conf)
        self._topic = topic
        self._schema = LocalSchemaSource().writer_schema(schema_id)
        self._schema_id = schema_id

    def send(
        self,
        *,
        event_id: str,
        event_name: str,
        customer_id: str,
        value: Decimal | int | str,
        timestamp_ms: int,
        properties: Mapping[str, str] | None = None,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        record = event_record(event_id, event_name, customer_id, value, timestamp_ms, properties)
        self._encode_and_send(record, on_delivery)

    def cancel(
        self,
        *,
        event_id: str,
        event_name: str,
        customer_id: str,
        cancels: str,
        timestamp_ms: int,
        on_delivery: DeliveryCallback | None = None,
    ) -> None:
        """Take back the earlier event `cancels` of this meter and customer: its usage leaves
        the totals, and Stripe cancels it while it still can (within 24 hours). `event_id`
        is the cancel's own idempotency key."""
        if not any(f["name"] == "cancels" for f in self._schema["fields"]):
            raise ValueError(f"schema id {self._schema_id} has no cancels field (v4 on)")
        record = event_record(event_id, event_name, customer_id, 0, timestamp_ms, cancels=cancels)
        self._encode_and_send(record, on_delivery)

    def _encode_and_send(
        self, record: dict[str, Any], on_delivery: DeliveryCallback | None
    ) -> None:
        event_name, event_id = record["event_name"], record["event_id"]
        payload = encode_confluent(record, self._schema, self._schema_id)
        self.send_raw(message_key(event_name, event_id), payload, on_delivery=on_delivery)

    def send_raw(
        self,
        key: bytes | None,
        payload: bytes,
        *,
        partition: int | None = None,
        on_delivery: DeliveryCallback | None = None,
        record_time_ms: int | None = None,
    ) -> None:
        """Produce already-encoded bytes (the demo uses it for duplicates and bad messages;
        tests set `record_time_ms` to replay old or skewed producers)."""
        kwargs: dict[str, Any] = {"key": key, "value": payload}
        if partition is not None:
            kwargs["partition"] = partition
        if record_time_ms is not None:
            kwargs["timestamp"] = record_time_ms
        if on_delivery is not None:
            kwargs["on_delivery"] = on_delivery
        while True:
            try:
                self._producer.produce(self._topic, **kwargs)
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)

    def flush(self, timeout: float = 60.0) -> int:
        """Wait for delivery; returns the number of messages still undelivered."""
        remaining: int = self._producer.flush(timeout)
        return remaining
