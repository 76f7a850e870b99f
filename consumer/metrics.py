"""Every Prometheus metric, declared once. Names follow promtool's rules; no customer ids
as labels (unbounded cardinality): customers live in ClickHouse, not in metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """A registry per instance, so tests and several pipelines in one process don't collide."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        p = "usage_consumer_"
        # Messages read from the usage topic, before any classification.
        self.events_consumed = Counter(p + "events_consumed", "Messages consumed.", registry=r)
        # Events accepted into the ledger, by meter.
        self.events_accepted = Counter(
            p + "events_accepted", "Events accepted into the ledger.", ["meter"], registry=r
        )
        # Duplicates of an event id already in the ledger or earlier in the range.
        self.events_duplicate = Counter(
            p + "events_duplicate", "Duplicate events dropped.", ["meter"], registry=r
        )
        # Events beyond the meter's allowed lateness, sent to the late topic.
        self.events_late = Counter(
            p + "events_late", "Events later than the allowed lateness.", ["meter"], registry=r
        )
        # Cancel events recorded: each takes an earlier event's usage back out of the totals.
        self.events_cancel = Counter(
            p + "events_cancel", "Cancel events recorded.", ["meter"], registry=r
        )
        # Dead letters by reason (bounded set of reasons).
        self.events_invalid = Counter(
            p + "events_invalid", "Dead-lettered messages.", ["reason"], registry=r
        )
        # Duplicates whose first copy another partition wrote: producers not keying by id.
        self.events_duplicate_cross_partition = Counter(
            p + "events_duplicate_cross_partition",
            "Duplicates of an event id first written from another partition.",
            registry=r,
        )
        # Seconds per ClickHouse write step of a range.
        self.insert_seconds = Histogram(
            p + "clickhouse_insert_seconds",
            "ClickHouse write time per step.",
            ["table"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        # Window jobs waiting for the rollup thread (committed batches whose windows trail).
        self.rollup_jobs = Gauge(
            p + "rollup_jobs_waiting",
            "Batches done whose minute windows are not recomputed yet (queued or running).",
            registry=r,
        )
        # Rows written to ClickHouse, by table.
        self.insert_rows = Counter(
            p + "clickhouse_rows", "Rows written to ClickHouse.", ["table"], registry=r
        )
        # Ranges whose writes completed and whose offsets were committed.
        self.ranges_committed = Counter(
            p + "ranges_committed", "Ranges committed to Kafka.", registry=r
        )
        # Ranges re-formed from an intent after a crash or rebalance.
        self.ranges_reformed = Counter(
            p + "ranges_reformed", "Ranges re-formed from their intent.", registry=r
        )
        # Dead letters / late events their topic refused for good (too large): table only (P5).
        self.side_output_refused = Counter(
            p + "side_output_refused",
            "Side-output messages refused by their topic, kept in ClickHouse only.",
            ["output", "reason"],
            registry=r,
        )
        # Messages that crashed the consumer on every attempt, dead-lettered undecoded (P7).
        self.poison_quarantined = Counter(
            p + "poison_quarantined", "Poison messages quarantined.", registry=r
        )
        # Consumer lag per partition, from the fetch high watermark.
        self.consumer_lag = Gauge(
            p + "consumer_lag_messages",
            "Messages behind the high watermark.",
            ["partition"],
            registry=r,
        )
        # Event-time watermark lag behind wall time, per meter.
        self.watermark_lag = Gauge(
            p + "watermark_lag_seconds",
            "Wall time minus the event-time watermark.",
            ["meter"],
            registry=r,
        )
        # Stripe pushes written but not yet acknowledged.
        self.stripe_pending = Gauge(
            p + "stripe_pending_pushes", "Stripe pushes not yet acknowledged.", registry=r
        )
        # Age of the oldest pending push (alerting: Stripe refuses timestamps past 35 days).
        self.stripe_pending_age = Gauge(
            p + "stripe_pending_oldest_age_seconds",
            "Age of the oldest pending push.",
            registry=r,
        )
        # 1 when the emitter's last cycle found nothing to plan or send, and no window
        # recompute it plans from was behind when it began (drained).
        # 1 while this process holds the emitter lease (consumer/emitter/lease.py).
        self.emitter_lease_held = Gauge(
            p + "emitter_lease_held", "1 while this process runs the store's emitter.", registry=r
        )
        self.emitter_lease_epoch = Gauge(
            p + "emitter_lease_epoch",
            "The epoch of the emitter lease this process took last.",
            registry=r,
        )
        self.partitions_owned = Gauge(
            p + "partitions_owned",
            "Partitions of the events topic this process consumes: assigned, their state "
            "read, and the window jobs a crash left pending there queued.",
            registry=r,
        )
        self.stripe_idle = Gauge(
            p + "stripe_outbox_idle",
            "1 when this process holds the emitter lease, its last cycle had no work, and no "
            "window job of this process was behind or queued during it.",
            registry=r,
        )
        # Stripe requests by outcome (status code or error class).
        self.stripe_requests = Counter(
            p + "stripe_requests", "Stripe meter event stream requests.", ["status"], registry=r
        )
        # Stream requests Stripe answered with a duplicate-identifier 400 (some events of the
        # request it already held); each costs a request that carried no new usage.
        self.stripe_duplicate_requests = Counter(
            p + "stripe_duplicate_requests",
            "Stripe requests answered with a duplicate-identifier 400.",
            registry=r,
        )
        # Meter events learned from duplicate answers to be already delivered.
        self.stripe_duplicate_events = Counter(
            p + "stripe_duplicate_events",
            "Meter events a duplicate answer showed Stripe already held.",
            registry=r,
        )
        # Meter events acknowledged by Stripe, by mode.
        self.stripe_events = Counter(
            p + "stripe_events_emitted",
            "Meter events acknowledged by Stripe.",
            ["mode"],
            registry=r,
        )
        # Meter event sessions created (scheduled refreshes and expiry recoveries).
        self.stripe_sessions = Counter(
            p + "stripe_session_refreshes",
            "Meter event sessions created.",
            ["cause"],
            registry=r,
        )
        # Seconds spent waiting on the request-rate limiter.
        self.stripe_rate_wait = Counter(
            p + "stripe_rate_limit_wait_seconds",
            "Time waiting for the rate limiter.",
            registry=r,
        )
        # Seconds since the poll loop last made progress (liveness).
        self.last_poll = Gauge(
            p + "last_poll_timestamp_seconds", "When the poll loop last ran.", registry=r
        )
        # Meter events Stripe refused after a 2xx (error-report feed), by bounded error code.
        self.stripe_rejected = Counter(
            p + "stripe_events_rejected",
            "Meter events rejected asynchronously.",
            ["code"],
            registry=r,
        )
        # Rejections an error report counted but did not name (Stripe sends samples only).
        self.stripe_rejections_unidentified = Counter(
            p + "stripe_rejections_unidentified",
            "Reported rejections without a sample identifier.",
            registry=r,
        )
        # Unknown-outcome pushes checked against event summaries: landed, absent, ambiguous.
        self.stripe_verifications = Counter(
            p + "stripe_verifications",
            "Pushes checked against event summaries.",
            ["outcome"],
            registry=r,
        )
        # Pushes past Stripe's 35-day timestamp limit: held (expired) or re-dated by policy.
        self.stripe_past_limit = Counter(
            p + "stripe_pushes_past_limit",
            "Pushes past the 35-day limit.",
            ["action"],
            registry=r,
        )
        # Pushes set aside because sending them alone crashed the emitter (unanswered.py).
        self.stripe_quarantined = Counter(
            p + "stripe_pushes_quarantined",
            "Pushes quarantined after crashing the emitter.",
            registry=r,
        )
        # Pushes that are not billed and wait for a person: rejected, expired, unverifiable.
        self.stripe_held = Gauge(
            p + "stripe_pushes_held", "Pushes held out of billing.", ["status"], registry=r
        )
        # Pending pushes older than the alert age (Stripe refuses them past 35 days).
        self.stripe_near_limit = Gauge(
            p + "stripe_pushes_near_limit", "Pending pushes near the 35-day limit.", registry=r
        )
        # Cancelled usage taken back from Stripe: adjusted (cancelled there), unsent (never
        # sent), absent (Stripe had lost the event: never billed), or late (Stripe keeps
        # billing it: past 24 hours, or refused; a person decides).
        self.stripe_corrections = Counter(
            p + "stripe_corrections",
            "Cancelled usage taken back from Stripe, by outcome.",
            ["meter", "outcome"],
            registry=r,
        )
        # Usage Stripe bills that was cancelled too late to take back (late corrections).
        self.stripe_overbilled = Gauge(
            p + "stripe_late_corrections_value",
            "Cancelled usage Stripe still bills, by meter.",
            ["meter"],
            registry=r,
        )
        # 1 while sending is paused because delivery marks cannot be written.
        self.stripe_sends_paused = Gauge(
            p + "stripe_sends_paused", "1 while marks cannot be written.", registry=r
        )
        # Last reconciliation: |Stripe - delivered| summed over windows, and windows drifting.
        self.reconcile_drift = Gauge(
            p + "reconcile_drift", "Drift found by the last reconcile.", ["meter"], registry=r
        )
        self.reconcile_windows = Gauge(
            p + "reconcile_drifting_windows",
            "Windows drifting in the last reconcile.",
            ["meter"],
            registry=r,
        )
        # ClickHouse calls that failed and are retried, by the stage that retries them.
        self.clickhouse_errors = Counter(
            p + "clickhouse_errors",
            "Failed ClickHouse calls, retried (stage: ingest, rollup, emitter).",
            ["stage"],
            registry=r,
        )
        # Emitter cycles that failed and are retried, by error class (a bounded set).
        self.emitter_failures = Counter(
            p + "emitter_cycle_failures",
            "Emitter cycles that failed and are retried, by error class.",
            ["error"],
            registry=r,
        )
        # Delivery marks that failed to write (each pauses sending until one succeeds).
        self.stripe_mark_failures = Counter(
            p + "stripe_mark_failures", "Failed delivery mark writes.", registry=r
        )
