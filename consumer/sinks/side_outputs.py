"""Side outputs: dead letters and late events produced to their topics, delivery confirmed.

A topic that refuses a record (too large, unknown, unauthorized) is recorded once and the
record stays in its table only; any other failure is transient and retried with its range.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from consumer import crash_points
from consumer.classify.classifier import DeadLetter, Late
from consumer.records import Record

log = logging.getLogger(__name__)
HEADER = "usage-consumer."
# On a copy `dlq redrive` produced: the dead letter it came from (topic/partition/offset),
# and the re-drive run that produced it.
REDRIVE_OF = HEADER + "redrive-of"
REDRIVE_ID = HEADER + "redrive-id"


def redriven(rec: Record) -> bool:
    """A copy of a dead letter, produced again by `dlq redrive`."""
    return any(k == REDRIVE_OF for k, _ in rec.headers)


def _own_headers(rec: Record) -> list[tuple[str, str | bytes | None]]:
    """The message's own headers, so a dead letter keeps them (a re-driven copy's link to
    its original among them); ours of an earlier pass are written afresh."""
    return [(k, v) for k, v in rec.headers if not k.startswith(HEADER) or k in _LINKS]


def _source_headers(rec: Record) -> list[tuple[str, str | bytes | None]]:
    """Source position headers let a re-drive dedupe the copies a retried range produces (P5)."""
    return [
        (HEADER + "source-topic", rec.topic.encode()),
        (HEADER + "source-partition", str(rec.partition).encode()),
        (HEADER + "source-offset", str(rec.offset).encode()),
        (HEADER + "source-timestamp", str(rec.timestamp_ms).encode()),
    ]


_LINKS = (REDRIVE_OF, REDRIVE_ID)


class SideOutputError(Exception):
    """A dead-letter or late produce could not be confirmed; the range must not complete."""


# Answers no retry can change: the message itself is refused (e.g. larger than the topic or
# the producer allows). The copy in the dead_letters / late_events table is what remains.
_REFUSED = {
    KafkaError.MSG_SIZE_TOO_LARGE: "message_too_large",
    KafkaError.RECORD_LIST_TOO_LARGE: "message_too_large",
    KafkaError.INVALID_MSG_SIZE: "message_too_large",
    KafkaError.INVALID_RECORD: "invalid_record",
}
# (output, reason) -> called once per message a topic refused
Fallback = Callable[[str, str, Record], None]


class SideOutputs:
    """Produces dead letters and late events, and confirms delivery before a range completes.

    A message the topic refuses for good is not retried forever (that would wedge the
    partition): it stays in its table only, and `on_fallback` alerts (P5)."""

    def __init__(
        self,
        producer: Producer,
        dlq_topic: str,
        late_topic: str,
        flush_timeout: float = 30.0,
        on_fallback: Fallback | None = None,
    ) -> None:
        self._producer = producer
        self._dlq = dlq_topic
        self._late = late_topic
        self._timeout = flush_timeout
        self._on_fallback = on_fallback or log_fallback

    def publish(self, dead: Sequence[DeadLetter], late: Sequence[Late]) -> None:
        if not dead and not late:
            return
        errors: list[KafkaError] = []

        def delivered(output: str, rec: Record) -> Callable[[KafkaError | None, Message], None]:
            def on_delivery(err: KafkaError | None, _msg: Message) -> None:
                if err is None:
                    return
                if err.code() in _REFUSED:
                    self._on_fallback(output, _REFUSED[err.code()], rec)
                else:
                    errors.append(err)

            return on_delivery

        for d in dead:
            headers = [
                *_own_headers(d.record),
                *_source_headers(d.record),
                (HEADER + "reason", d.reason.encode()),
                (HEADER + "detail", d.detail.encode()[:1000]),
            ]
            self._produce(self._dlq, "dead_letter", d.record, headers, delivered)
        for x in late:
            headers = [
                *_source_headers(x.record),
                (HEADER + "meter", x.meter.name.encode()),
                (HEADER + "watermark-ms", str(x.watermark_ms).encode()),
            ]
            self._produce(self._late, "late", x.record, headers, delivered)
        crash_points.reached("before_side_output_flush")  # produced, delivery not yet confirmed
        remaining = self._producer.flush(self._timeout)
        if remaining or errors:
            detail = errors[0].str() if errors else f"{remaining} messages not delivered"
            raise SideOutputError(f"side output produce failed: {detail}")

    def _produce(
        self,
        topic: str,
        output: str,
        rec: Record,
        headers: list[tuple[str, str | bytes | None]],
        delivered: Callable[[str, Record], Callable[[KafkaError | None, Message], None]],
    ) -> None:
        while True:
            try:
                self._producer.produce(
                    topic,
                    value=rec.value,
                    key=rec.key,
                    headers=headers,
                    on_delivery=delivered(output, rec),
                )
                return
            except BufferError:
                self._producer.poll(0.1)
            except KafkaException as exc:
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if err is not None and err.code() in _REFUSED:  # refused before it left
                    self._on_fallback(output, _REFUSED[err.code()], rec)
                    return
                raise SideOutputError(f"side output produce failed: {exc}") from exc


def log_fallback(output: str, reason: str, rec: Record) -> None:
    log.error(
        "%s for %s/%d offset %d refused by its topic (%s): kept in its table only",
        output,
        rec.topic,
        rec.partition,
        rec.offset,
        reason,
    )
