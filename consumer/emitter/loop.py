"""The emitter loop: plan aggregated intents, send pending pushes concurrently, mark each
request after its 2xx. A Stripe outage only grows the outbox; ingestion never waits on it."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor, as_completed

from consumer.clock import Clock
from consumer.config import MeterConfig
from consumer.emitter import outbox
from consumer.emitter.outbox import Push
from consumer.emitter.sender import Sender, SendFailed
from consumer.faults import fault_point
from consumer.metrics import Metrics
from consumer.store.backend import Backend, StoreError

log = logging.getLogger(__name__)
DAY_MS = 86_400_000


class Emitter:
    def __init__(
        self,
        store: Backend,
        sender: Sender,
        meters: list[MeterConfig],
        clock: Clock,
        metrics: Metrics,
        concurrency: int,
        per_request: int,
        lookback_days: int,
        poll_interval: float,
    ) -> None:
        self._store = store
        self._sender = sender
        self._aggregated = [m for m in meters if m.stripe_event_name and m.emission == "aggregated"]
        self._clock = clock
        self._metrics = metrics
        self._per_request = per_request
        self._lookback_ms = lookback_days * DAY_MS
        self._poll = poll_interval
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="stripe")
        self._concurrency = concurrency
        self.cycles = 0
        self.stopping = threading.Event()
        self.last_idle_cycle = 0

    def run_once(self) -> int:
        """One cycle; returns how many pushes were planned or sent (0 = nothing to do)."""
        self.cycles += 1
        cycle = self.cycles
        now_ms = int(self._clock.now() * 1000)
        planned = []
        for meter in self._aggregated:
            planned += outbox.plan_aggregated(self._store, meter, now_ms - self._lookback_ms)
        outbox.write(self._store, planned, outbox.PENDING, now_ms)
        batch = outbox.pending(self._store, self._per_request * self._concurrency * 4)
        fresh = [p for p in batch if not p.first_attempt_ms]
        outbox.write(self._store, fresh, outbox.PENDING, now_ms)  # first_attempt_at, before sending
        self._report()
        try:
            self._send(batch)
        finally:
            self._report()  # also while Stripe fails: the backlog is what alerts watch
        if not planned and not batch:
            self.last_idle_cycle = cycle
        self._metrics.stripe_idle.set(0 if planned or batch else 1)
        return len(planned) + len(batch)

    def _send_unless_stopping(self, chunk: list[Push]) -> list[Push]:
        """On shutdown, requests not yet started are skipped (they stay pending)."""
        return [] if self.stopping.is_set() else self._sender.send(chunk)

    def _send(self, batch: list[Push]) -> None:
        chunks = [batch[i : i + self._per_request] for i in range(0, len(batch), self._per_request)]
        futures: list[Future[list[Push]]] = [
            self._pool.submit(self._send_unless_stopping, c) for c in chunks
        ]
        failure: BaseException | None = None
        for done, fut in enumerate(as_completed(futures)):
            if done == 1:
                fault_point("stripe_mid_batch")  # some requests answered, some in flight
            try:
                delivered = fut.result()
            except SendFailed as exc:
                failure = exc
                continue
            fault_point("after_stripe_2xx")
            outbox.write(self._store, delivered, outbox.SENT, int(self._clock.now() * 1000))
            for p in delivered:
                self._metrics.stripe_events.labels(p.mode).inc()
        if failure is not None:
            raise failure

    def _report(self) -> None:
        n, oldest = outbox.count_pending(self._store)
        self._metrics.stripe_pending.set(n)
        age = self._clock.now() - oldest / 1000 if oldest else 0.0
        self._metrics.stripe_pending_age.set(age)
        if age > 30 * 86400:
            log.error(
                "pending Stripe usage is %.1f days old: Stripe refuses it past 35 days", age / 86400
            )

    def drained_since(self, cycle: int) -> bool:
        """True once a cycle that started after `cycle` found nothing to plan or send."""
        return self.last_idle_cycle > cycle

    def run(self, stop: threading.Event) -> None:
        """Loop until `stop`; transient Stripe or ClickHouse failures back off and retry."""
        self.stopping = stop
        backoff = self._poll
        while not stop.is_set():
            try:
                worked = self.run_once()
                backoff = self._poll
            except (SendFailed, StoreError) as exc:
                log.warning("emitter cycle failed, retrying: %s", exc)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if not worked:
                stop.wait(self._poll)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
