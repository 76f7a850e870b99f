"""What the consume loop and range making share: clients, clock, settings, failure kinds."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import Consumer

from consumer.classify.classifier import Classifier
from consumer.clock import Clock
from consumer.decode.schemas import SchemaSourceUnavailable
from consumer.ingest.kafka import TopicIdUnavailable
from consumer.intent.commit import CommitSequence
from consumer.metrics import Metrics
from consumer.sinks.side_outputs import SideOutputError
from consumer.store.backend import Backend, StoreUnavailable

# A StoreBug (the store refused a statement itself) is in neither: it stops the process.
TRANSIENT = (StoreUnavailable, SchemaSourceUnavailable, SideOutputError)
UNREADY = (StoreUnavailable, TopicIdUnavailable)  # what keeps an assignment paused
# (what failed, the failure, partitions to pause): pause, keep the data, back off
OnTransient = Callable[[str, Exception, list[int]], None]


@dataclass
class IngestContext:
    consumer: Consumer
    store: Backend
    commits: CommitSequence
    classifier: Classifier
    clock: Clock
    metrics: Metrics
    topic: str
    group: str
    config_hash: str
    dedup_window_ms: int
    max_invalid_ratio: float = 0.5
    flood_min_messages: int = 1000
    poison_after_attempts: int = 3
    topic_ids: Callable[[str], str] | None = None  # None: incarnations are not told apart
    # Held from a batch's ledger question to its ledger write being durable; instances on
    # one store share it (consumer/ingest/ledger_lock.py).
    ledger_lock: threading.Lock = field(default_factory=threading.Lock)
