"""The whole pipeline, wired in one place. Read `build_pipeline` first.

Kafka -> decode -> validate -> dedup -> window/classify -> ClickHouse sink -> commit
                                                \\-> dead letters / late events
ClickHouse outbox (stripe_pushes) -> Stripe emitter loop (its own thread)
"""

from __future__ import annotations

import gc
import logging
import socket
import threading
from dataclasses import dataclass

from confluent_kafka import Consumer, Producer

from consumer.classify.classifier import Classifier
from consumer.clock import Clock
from consumer.config import ConfigError, SchemaConfig, Settings
from consumer.control import claim
from consumer.decode import fast
from consumer.decode.reference import Decoder
from consumer.decode.schemas import (
    LocalSchemaSource,
    RegistrySchemaSource,
    load_schema,
    reader_schema,
)
from consumer.decode.validate import DAY_MS, Limits
from consumer.emitter.lease import EmitterLease
from consumer.emitter.loop import Emitter, Upstream
from consumer.emitter.send.ratelimit import TokenBucket
from consumer.emitter.send.sender import Sender
from consumer.emitter.send.session import SessionKeeper, stripe_client
from consumer.ingest.kafka import (
    TopicIds,
    consumer_config,
    ensure_control_topic,
    lease_config,
    producer_config,
)
from consumer.ingest.ledger_lock import ledger_lock
from consumer.ingest.loop import IngestContext, Ingestor
from consumer.intent.commit import CommitSequence
from consumer.liveness import Heartbeat
from consumer.metrics import Metrics
from consumer.ops import meters_sync
from consumer.ops.health import Health
from consumer.records import Record
from consumer.sinks.rollup import Rollup
from consumer.sinks.side_outputs import Fallback, SideOutputs, log_fallback
from consumer.store import Backend, open_store, tenants
from consumer.store.backend import StoreBug
from consumer.store.cluster import cluster_of, sync_replicas
from consumer.store.config_versions import record_config
from consumer.store.prepare import prepare_store

log = logging.getLogger(__name__)


class EmitterFailed(Exception):
    """The emitter thread died; the process stops so that it is restarted and seen."""


@dataclass
class Pipeline:
    settings: Settings
    store: Backend
    consumer: Consumer
    producer: Producer
    ingestor: Ingestor
    emitter: Emitter | None
    metrics: Metrics
    health: Health
    owns_store: bool = True

    @property
    def rollup(self) -> Rollup:
        return self.ingestor.ctx.commits.rollup

    def run(self, stop: threading.Event) -> None:
        """Consume and emit until `stop`; then drain in-flight work, commit, and close."""
        tune_gc()
        emitter_stop = threading.Event()
        thread = None
        failures: list[BaseException] = []
        if self.emitter is not None:
            emitter = self.emitter

            def emit() -> None:
                try:
                    emitter.run(emitter_stop)
                except BaseException as exc:
                    failures.append(exc)
                    raise

            thread = threading.Thread(target=emit, name="emitter", daemon=True)
            thread.start()
        try:
            while not stop.is_set():
                if thread is not None and not thread.is_alive():
                    # A bug (or an answer Stripe never documents) stopped the emitter: exit
                    # loudly rather than ingest on while the outbox silently grows.
                    cause = failures[0] if failures else None
                    if isinstance(cause, StoreBug):  # the statement and its code, in one line
                        raise cause
                    raise EmitterFailed(f"the Stripe emitter stopped: {cause!r}") from cause
                self.ingestor.step()
                self.rollup.check()
                self.health.progressed()
                self.health.ready["kafka"] = True
                self.health.ready["clickhouse"] = self.ingestor.healthy and self.rollup.healthy
        finally:
            emitter_stop.set()
            if thread is not None:
                thread.join()
            self.close()

    def close(self) -> None:
        if self.emitter is not None:  # also when it never ran: its lease member leaves
            self.emitter.close()
        self.ingestor.ctx.commits.close()
        self.consumer.close()
        self.producer.flush(10)
        if self.owns_store:  # a store handed in (shared by instances in one process) stays open
            self.store.close()


def tune_gc() -> None:
    """The consume loop allocates a few objects per message (100,000s a second): with the
    default thresholds the cyclic collector ran every 700 of them and walked every buffered
    message, which more than doubled the cost of reading a range's columns. Collect young
    objects every 50,000 allocations instead, and leave what startup built out of it."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def build_decoder(cfg: SchemaConfig) -> Decoder:
    decoder = _decoder(cfg)
    if decoder.fast:
        log.info("decoder: the C fast path (fastavro for the rows it leaves)")
    elif cfg.mode == "plain":
        log.info("decoder: fastavro (plain Avro messages have no fast path)")
    elif cfg.fast_decoder:
        log.warning("decoder: fastavro only, several times slower: %s", fast.UNAVAILABLE)
    else:
        log.info("decoder: fastavro only (schema.fast_decoder is false)")
    return decoder


def _decoder(cfg: SchemaConfig) -> Decoder:
    if cfg.mode == "plain":
        assert cfg.plain_writer_schema is not None
        return Decoder(
            mode="plain",
            source=None,
            reader=reader_schema(),
            plain_writer=load_schema(cfg.plain_writer_schema),
            fast=False,
        )
    if cfg.registry_url:
        auth = None
        if cfg.registry_username and cfg.registry_password:
            auth = (cfg.registry_username, cfg.registry_password.get_secret_value())
        source: LocalSchemaSource | RegistrySchemaSource = RegistrySchemaSource(
            cfg.registry_url, auth=auth
        )
    else:
        source = LocalSchemaSource()
    return Decoder(mode="confluent", source=source, reader=reader_schema(), fast=cfg.fast_decoder)


def stripe_key(settings: Settings) -> str:
    """The Stripe key, or a configuration error before anything connects anywhere."""
    if settings.stripe.api_key is None:
        raise ConfigError(
            "stripe.api_key: required when stripe.enabled is true "
            "(set USAGE_CONSUMER_STRIPE__API_KEY, or stripe.enabled: false)"
        )
    return settings.stripe.api_key.get_secret_value()


def build_emitter(
    settings: Settings,
    store: Backend,
    clock: Clock,
    metrics: Metrics,
    upstream: Upstream | None = None,
    lease: EmitterLease | None = None,
    heartbeat: Heartbeat | None = None,
) -> Emitter:
    s = settings.stripe
    api_key = stripe_key(settings)
    bases = {"api": s.api_base, "meter_events": s.meter_events_base}
    api = stripe_client(api_key, bases)
    sessions = SessionKeeper(api, clock, s.session_refresh_margin_seconds, metrics)
    limiter = TokenBucket(s.requests_per_second, clock)
    keys = {
        m.stripe_event_name: (m.stripe_customer_key, m.stripe_value_key)
        for m in settings.meters
        if m.stripe_event_name
    }
    sender = Sender(sessions, bases, clock, limiter, metrics, s.max_retries, keys=keys)
    meters = list(settings.meters)

    def check_meters() -> None:
        meters_sync.verify(api, meters, s, limiter.acquire)

    return Emitter(
        store,
        sender,
        list(settings.meters),
        clock,
        metrics,
        s.concurrency,
        s.max_events_per_request,
        s.lookback_days,
        s.poll_interval_seconds,
        config=s,
        check=check_meters if s.verify_meters else None,
        upstream=upstream,
        lease=lease,
        heartbeat=heartbeat,
        crash_limit=settings.pipeline.poison_after_attempts,
    )


def side_output_alert(metrics: Metrics) -> Fallback:
    def alert(output: str, reason: str, rec: Record) -> None:
        log_fallback(output, reason, rec)
        metrics.side_output_refused.labels(output, reason).inc()

    return alert


def ingest_epoch(settings: Settings, producer: Producer, clock: Clock) -> int:
    """The fencing epoch of this process's ingest state rows (P4): a claim on the control
    topic, so a later process has a higher one whatever the hosts' clocks say; the wall
    clock only where no control topic is configured (one process per store)."""
    k = settings.kafka
    if k.control_topic is None:
        return int(clock.now() * 1000)
    ensure_control_topic(k)
    epoch = claim(producer, k.control_topic, {"ingest": k.group_id, "by": socket.gethostname()})
    log.info("ingest epoch %d (claimed on %s)", epoch, k.control_topic)
    return epoch


def build_pipeline(
    settings: Settings,
    clock: Clock,
    metrics: Metrics,
    health: Health,
    store: Backend | None = None,
) -> Pipeline:
    """decode -> validate -> dedup -> classify -> sink -> commit, plus the emitter."""
    k, p = settings.kafka, settings.pipeline
    if settings.stripe.enabled:
        stripe_key(settings)
    owns_store = store is None
    store = store or open_store(settings.clickhouse)
    cluster = cluster_of(settings.clickhouse)
    prepare_store(store, settings.clickhouse)
    if cluster is not None:
        sync_replicas(store, cluster)
    record_config(store, settings.config_hash(), settings.classification_body())
    tenants.ensure(store, settings.stripe.account_property)  # before any ledger write
    classifier = Classifier(
        decoder=build_decoder(settings.schema_),
        meters=settings.meter_for_event(),
        limits=Limits(p.future_tolerance_seconds * 1000, p.max_past_days * DAY_MS),
    )
    producer = Producer(producer_config(k))
    consumer = Consumer(consumer_config(k))
    commits = CommitSequence(
        store=store,
        side=SideOutputs(
            producer, k.dlq_topic, k.late_topic, on_fallback=side_output_alert(metrics)
        ),
        consumer=consumer,
        metrics=metrics,
        group=k.group_id,
        topic=k.topic,
        epoch=ingest_epoch(settings, producer, clock),
        rollup=Rollup(
            store,
            k.group_id,
            k.topic,
            clock,
            metrics,
            threads=p.rollup_threads,
            horizon_ms=p.dedup_window_seconds * 1000,
            heartbeat=health.part("rollup"),
            waiting=health.part("consume"),
        ),
        tenant_property=settings.stripe.account_property,
    )
    ingestor = Ingestor(
        IngestContext(
            consumer=consumer,
            store=store,
            commits=commits,
            classifier=classifier,
            clock=clock,
            metrics=metrics,
            topic=k.topic,
            group=k.group_id,
            config_hash=settings.config_hash(),
            dedup_window_ms=p.dedup_window_seconds * 1000,
            max_invalid_ratio=p.max_invalid_ratio,
            flood_min_messages=p.invalid_ratio_min_messages,
            poison_after_attempts=p.poison_after_attempts,
            topic_ids=TopicIds(k),
            ledger_lock=ledger_lock(settings.clickhouse),
        ),
        batch_max=p.batch_max_messages,
        batch_seconds=p.batch_max_seconds,
    )
    consumer.subscribe(
        [k.topic],
        on_assign=ingestor.on_assign,
        on_revoke=ingestor.on_revoke,
        on_lost=ingestor.on_revoke,
    )
    emitter = None
    if settings.stripe.enabled:
        lease = None
        if k.control_topic is not None:
            lease = EmitterLease(
                Consumer(lease_config(k)), producer, store, k.group_id, k.control_topic, metrics
            )
        emitter = build_emitter(
            settings, store, clock, metrics, commits.rollup, lease, health.part("emitter")
        )
    return Pipeline(
        settings, store, consumer, producer, ingestor, emitter, metrics, health, owns_store
    )
