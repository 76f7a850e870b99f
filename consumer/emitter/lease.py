"""One active emitter per consumer group, however many processes run: the emitter runs
only in the process that holds the one partition of the control topic.

Kafka's group coordinator decides the holder (a member that stops heartbeating, or stops
polling past `max.poll.interval.ms`, loses it; a clean close hands it over at once). On
taking it, the holder appends a claim to that partition (consumer/control.py): the
claim's offset is its epoch, higher than every earlier holder's whatever the hosts' clocks
say, and it is registered in `emitter_epochs` before the holder reads anything. Before it
writes a plan and before it sends, the emitter fences: it must still be assigned, and its
epoch must still be the highest registered. A deposed holder (a process paused past its
session and resumed) finds a higher epoch and stops before its next write or request; a
plan it wrote after the new holder registered is never sent by it. What a check cannot
close is a holder paused between its last check and the write or request right after it:
see docs/limits.md.
"""

from __future__ import annotations

import logging
import socket

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from consumer.control import ClaimFailed, claim
from consumer.metrics import Metrics
from consumer.store.backend import Backend

log = logging.getLogger(__name__)


class Deposed(Exception):
    """This process does not hold the emitter lease (any more): write and send nothing."""


class LeaseUnavailable(Exception):
    """The claim could not be appended or registered yet (transient)."""


class EmitterLease:
    """The emitter side of the lease; `hold` and `fence` are called from the emitter thread
    only (a Kafka consumer is not shared between threads)."""

    def __init__(
        self,
        consumer: Consumer,
        producer: Producer,
        store: Backend,
        group: str,
        topic: str,
        metrics: Metrics,
        timeout: float = 10.0,
    ) -> None:
        self._consumer, self._producer, self._store = consumer, producer, store
        self._group, self._topic = group, topic
        self._metrics = metrics
        self._timeout = timeout
        self._owned = False
        # Superseded while still assigned (the coordinator moved the lease and this member
        # has not heard yet): no new claim until Kafka assigns the partition afresh, or two
        # processes would take turns superseding each other.
        self._superseded = False
        self.epoch: int | None = None
        self.holder = f"{socket.gethostname()}/{id(self):x}"
        self._joined = self._closed = False

    def _assigned(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        if any(tp.topic == self._topic for tp in partitions):
            self._owned, self._superseded = True, False

    def _revoked(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        if any(tp.topic == self._topic for tp in partitions):
            self._owned, self.epoch = False, None
            self._metrics.emitter_lease_held.set(0)
            log.warning("emitter lease: given up (rebalanced or timed out)")

    def hold(self) -> int | None:
        """Keep the membership alive and, once assigned, claim an epoch; returns the epoch,
        or None while another process holds the lease."""
        if not self._joined:  # joined by the thread that polls: a member never polled
            self._joined = True  # would hold the lease until max.poll.interval.ms
            self._consumer.subscribe(
                [self._topic],
                on_assign=self._assigned,
                on_revoke=self._revoked,
                on_lost=self._revoked,
            )
        msg = self._consumer.poll(0)  # runs the callbacks; claims read back are not work
        err = msg.error() if msg is not None else None
        if err is not None and err.code() != KafkaError._PARTITION_EOF:
            log.warning("emitter lease: %s", err)
        if self._owned and self.epoch is None and not self._superseded:
            self.epoch = self._claim()
            self._metrics.emitter_lease_held.set(1)
            self._metrics.emitter_lease_epoch.set(self.epoch)
            log.info("emitter lease: taken with epoch %d", self.epoch)
        return self.epoch if self._owned and not self._superseded else None

    def fence(self) -> None:
        """Raise Deposed unless this process still holds the lease with the newest epoch."""
        epoch = self.epoch
        if not self._owned or epoch is None:
            raise Deposed("this process does not hold the emitter lease")
        rows = self._store.query(
            "SELECT max(epoch) FROM emitter_epochs WHERE group_id = {g:String}",
            {"g": self._group},
        )
        newest = int(rows[0][0]) if rows else 0
        if newest != epoch:
            self.epoch, self._superseded = None, True
            self._metrics.emitter_lease_held.set(0)
            raise Deposed(f"emitter epoch {epoch} was superseded by {newest}")

    def _claim(self) -> int:
        """Claim an epoch and register it in ClickHouse before it is returned, so a holder
        never works on an unregistered one."""
        try:
            epoch = claim(self._producer, self._topic, {"lease": self._group, "by": self.holder})
        except ClaimFailed as exc:
            raise LeaseUnavailable(str(exc)) from None
        self._store.command(
            """INSERT INTO emitter_epochs (group_id, epoch, holder)
               VALUES ({g:String}, {e:UInt64}, {h:String})""",
            {"g": self._group, "e": epoch, "h": self.holder},
        )
        return epoch

    def close(self) -> None:
        """Leave the group: the next holder is assigned without waiting for a timeout."""
        if not self._closed:
            self._closed = True
            self._consumer.close()
