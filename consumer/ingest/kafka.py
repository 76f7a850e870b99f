"""Kafka clients built from configuration, and the topic id that tells incarnations apart.

librdkafka settings pass through untouched; secrets go only into the client config.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from consumer.config import KafkaConfig

log = logging.getLogger(__name__)


def client_config(cfg: KafkaConfig) -> dict[str, Any]:
    # librdkafka's own lines through Python logging (its format, its secret redaction),
    # not written to stderr behind its back
    conf: dict[str, Any] = {
        "bootstrap.servers": cfg.bootstrap_servers,
        "logger": logging.getLogger("librdkafka"),
    }
    if cfg.sasl_username is not None:
        conf["sasl.username"] = cfg.sasl_username
    if cfg.sasl_password is not None:
        conf["sasl.password"] = cfg.sasl_password.get_secret_value()
    conf.update(cfg.librdkafka)
    return conf


def consumer_config(cfg: KafkaConfig) -> dict[str, Any]:
    """Manual commits only after effects are durable; offsets never stored automatically."""
    conf = {
        "group.id": cfg.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": cfg.auto_offset_reset,
        "partition.assignment.strategy": "cooperative-sticky",
        "isolation.level": "read_committed",
        "enable.partition.eof": False,
    }
    if cfg.group_instance_id is not None:  # the events consumer only: the lease leaves at once
        conf["group.instance.id"] = cfg.group_instance_id
    conf.update(client_config(cfg))
    conf.update(cfg.consumer_librdkafka)
    return conf


def lease_config(cfg: KafkaConfig) -> dict[str, Any]:
    """The emitter lease's member (consumer/emitter/lease.py): its own group, the main
    consumer's session timeout (how fast a dead holder is replaced), but not its poll
    interval: an emitter cycle under a Stripe outage may retry for minutes."""
    conf: dict[str, Any] = {
        "group.id": f"{cfg.group_id}.emitter",
        "enable.auto.commit": False,
        "auto.offset.reset": "latest",
        "partition.assignment.strategy": "cooperative-sticky",
        "max.poll.interval.ms": 300_000,
    }
    conf.update(client_config(cfg))
    for key in ("session.timeout.ms", "heartbeat.interval.ms"):
        if key in cfg.consumer_librdkafka:
            conf[key] = cfg.consumer_librdkafka[key]
    return conf


def ensure_control_topic(cfg: KafkaConfig, timeout: float = 10.0) -> None:
    """Create the one-partition control topic unless it exists; a broker that refuses
    (no permission) is told plainly: an operator creates it."""
    if cfg.control_topic is None:
        return
    admin = AdminClient(client_config(cfg))
    if cfg.control_topic in admin.list_topics(timeout=timeout).topics:
        return
    # Stamped by the broker's clock: `doctor` measures this host's clock against it.
    stamped = {"message.timestamp.type": "LogAppendTime"}
    topic = NewTopic(cfg.control_topic, 1, config=stamped)
    future = admin.create_topics([topic])[cfg.control_topic]
    try:
        future.result(timeout=timeout)
        log.info("created control topic %s (1 partition)", cfg.control_topic)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise KafkaException(
                f"cannot create kafka.control_topic {cfg.control_topic!r} ({exc}): create it "
                "with one partition, or set kafka.control_topic to null for a single process"
            ) from None


def producer_config(cfg: KafkaConfig) -> dict[str, Any]:
    conf = {"acks": "all", "enable.idempotence": True, "linger.ms": 5}
    conf.update(client_config(cfg))
    conf.update(cfg.producer_librdkafka)
    return conf


class TopicIdUnavailable(Exception):
    """The broker could not say which incarnation of the topic this is (transient)."""


class TopicIds:
    """The topic's id, which changes when a topic is deleted and re-created (P4)."""

    def __init__(self, cfg: KafkaConfig, timeout: float = 10.0) -> None:
        self._admin = AdminClient(client_config(cfg))
        self._timeout = timeout

    def __call__(self, topic: str) -> str:
        try:
            found = self._admin.describe_topics(TopicCollection([topic]))[topic]
            return str(found.result(timeout=self._timeout).topic_id)
        except Exception as exc:  # KafkaException, timeouts: all mean "ask again later"
            raise TopicIdUnavailable(f"describe topic {topic}: {exc}") from None
