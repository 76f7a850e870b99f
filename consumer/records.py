"""The unit that flows through the stages: a Kafka message detached from the client."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = field(default=())

    @property
    def position(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)
