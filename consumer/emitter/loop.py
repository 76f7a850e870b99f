"""The emitter loop: read Stripe's error reports, plan aggregated intents, settle unknown
outcomes, hold or re-date usage past Stripe's 35-day limit, send pending pushes
concurrently, and mark each request after its 2xx. A Stripe outage only grows the outbox;
ingestion never waits on it.

A cycle, in order (each concern in its own module; this one only orders them):
  1. write marks left over from a cycle whose marks failed; until that works, send nothing
     (marks.py)
  2. mark rows that Stripe's error reports rejected (a 2xx is not billing) (reports.py)
  3. take cancelled usage back: never send it, cancel it at Stripe within 24 hours, or
     record it as a late correction (corrections.py)
  4. plan aggregated deltas as new intents (outbox.py)
  5. check minutes with unknown outcomes past `verify_after` against event summaries
     (verify.py)
  6. hold (or, by policy, re-date) never-sent pushes past the 35-day limit (limits.py)
  7. record first_attempt_at, and the amount each will send (units.py), for pushes about to
     be sent for the first time
  8. send, keeping requests in flight and topping the queue up with never-sent pushes
     (dispatch.py); mark each request's rows after its 2xx; a failed mark stops the rest.
     After a restart, what the dead sender left in flight is counted and sent again, and
     a push counted twice is sent alone, or set aside once it crashed too often
     (unanswered.py)
  9. record in the open-work table what was settled, and delete it there now and then
     (outbox.tidy): every read above selects only the pushes it names
The backlog gauges and the near-limit alert are reported around the send (alerts.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import stripe

from consumer.clock import Clock
from consumer.config import MeterConfig, StripeConfig
from consumer.emitter.lease import Deposed, EmitterLease, LeaseUnavailable
from consumer.emitter.plan import outbox, queue
from consumer.emitter.plan.accounts import AccountResolver
from consumer.emitter.plan.buckets import anchors
from consumer.emitter.plan.outbox import ATTEMPTED, Push
from consumer.emitter.plan.units import Assigner, rules_for
from consumer.emitter.send.dispatch import TOP_UP_FOR, Dispatch
from consumer.emitter.send.marks import Marks, MarksBlocked
from consumer.emitter.send.sender import Sender, SendFailed
from consumer.emitter.send.unanswered import Suspects, with_count
from consumer.emitter.truth.alerts import BacklogAlerts
from consumer.emitter.truth.corrections import Corrector
from consumer.emitter.truth.delivery import DAY_MS, DeliveryPolicy
from consumer.emitter.truth.error_reports import ReportTaker
from consumer.emitter.truth.summaries import SummaryReader
from consumer.emitter.truth.too_old import Limits
from consumer.emitter.truth.verify import Verifier
from consumer.liveness import Heartbeat
from consumer.metrics import Metrics
from consumer.store.backend import Backend, StoreUnavailable

__all__ = ["Emitter", "MarksBlocked"]
log = logging.getLogger(__name__)
READ_AHEAD_MAX = 50_000  # never-sent pushes held in memory for top-ups (about 20 MB)
# What a cycle retries: Stripe failing, ClickHouse away, the lease unknown. Anything else
# ends the emitter thread, and the process with it.
RETRIED = (SendFailed, StoreUnavailable, LeaseUnavailable, Deposed)


class Upstream(Protocol):
    """Work this process committed that the emitter plans from once it is in the store: the
    window jobs of consumer/sinks/rollup.py."""

    @property
    def behind(self) -> int:
        """Jobs queued or running."""

    @property
    def submitted(self) -> int:
        """Jobs ever queued: one queued and finished while a cycle ran changes it."""


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
        config: StripeConfig | None = None,
        check: Callable[[], None] | None = None,
        upstream: Upstream | None = None,
        lease: EmitterLease | None = None,
        heartbeat: Heartbeat | None = None,
        crash_limit: int = 3,
    ) -> None:
        self._store = store
        # Beats every turn of run() and every top-up of a send (/healthz: stuck or not).
        self._heartbeat = heartbeat
        # None: this emitter is the store's only one by construction (tests, benches).
        self._lease = lease
        # Work not yet in the store that will be (committed batches whose windows are still
        # being recomputed): while there is some, a cycle without work is not idle.
        self._upstream = upstream
        self._check = check  # run before the first cycle sends: are Stripe's meters right?
        self._sender = sender
        self._aggregated = [m for m in meters if m.stripe_event_name and m.emission == "aggregated"]
        self._clock = clock
        self._metrics = metrics
        self._per_request = per_request
        self._lookback_ms = lookback_days * DAY_MS
        self._poll = poll_interval
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="stripe")
        self._concurrency = concurrency
        config = config or StripeConfig()
        self._anchor, self._period = config.period_anchor, config.period
        policy = DeliveryPolicy.from_config(config)
        self._policy = policy
        summaries = SummaryReader(sender.api, sender.pace)
        self._reports = ReportTaker(store, sender.api, policy, metrics, self._now_ms(), config)
        self._assigner = Assigner(store, rules_for(meters), AccountResolver(store, config))
        self._limits = Limits(store, policy, metrics, self._assigner)
        self._verifier = Verifier(store, summaries, policy, metrics, self._limits)
        self._alerts = BacklogAlerts(store, policy, metrics)
        self._marks = Marks(store, clock, metrics)
        # Attempted pushes a dead sender left are sent alone; `crash_limit` crashes set one aside.
        self._suspects = Suspects(store, metrics, crash_limit)
        self._alone: list[Push] = []  # this cycle's suspects
        self._again: list[Push] = []  # what a dead sender left in flight, counted once
        self._corrector = Corrector(
            store, sender, meters, metrics, self._anchor, self._period, lookback_days
        )
        # Enough never-sent pushes for a cycle's top-ups in one read (within a bound):
        # a read merges the whole outbox, so 6,400 rows cost about what 50,000 do.
        per_cycle = int(config.requests_per_second * TOP_UP_FOR) * per_request
        self._ahead = outbox.ReadAhead(store, min(max(per_cycle, 1), READ_AHEAD_MAX))
        self._dispatch = Dispatch(
            self._pool, sender, self._marks, clock, per_request, concurrency,
            config.requests_per_second,
        )  # fmt: skip
        self._bucketing_checked: set[str] = set()  # meters whose buckets passed the check
        self._deposed: Deposed | None = None  # set by a top-up that found the lease gone
        self.cycles = 0
        self.stopping = threading.Event()
        self.last_idle_cycle = 0

    def _now_ms(self) -> int:
        return int(self._clock.now() * 1000)

    def run_once(self) -> int:
        """One cycle; returns how much it did (0 = nothing to do)."""
        self.cycles += 1
        # Sampled before the cycle plans: when nothing was behind then, every committed
        # batch's windows were in the store for it to plan from. A job queued meanwhile (a
        # partition assigned mid-cycle recovers the ones a crash left) may have named its
        # windows after this cycle took the names: not idle either.
        up = self._upstream
        behind, submitted = (up.behind, up.submitted) if up is not None else (0, 0)
        if behind:
            self._metrics.stripe_idle.set(0)
        try:
            work = self._cycle()
        except BaseException:
            # A failed cycle is not an idle outbox: drain checks and alerts read this gauge.
            self._metrics.stripe_idle.set(0)
            self._assigner.forget()  # what it assigned may not have been written
            raise
        idle = not work and not behind and (up is None or up.submitted == submitted)
        if idle:
            self.last_idle_cycle = self.cycles
        self._metrics.stripe_idle.set(1 if idle else 0)
        return work

    def _fence(self) -> None:
        """Before a plan is written and before requests go: still the store's emitter?"""
        if self._lease is not None:
            self._lease.fence()

    def _cycle(self) -> int:
        if self._check is not None:
            self._verify_meters()
        self._fence()
        now_ms = self._now_ms()
        self._marks.flush(now_ms)  # 1
        taken = queue.take(self._store)  # the buckets to correct and plan (queue.py)
        work = self._reports.take(now_ms)  # 2
        work += self._corrector.run(now_ms, taken)  # 3
        if work:  # rejections and cancellations move carries: read them afresh
            self._assigner.forget()
        work += self._plan(now_ms, taken)  # 4
        queue.planned(self._store, taken)
        work += len(taken.names) >= queue.TAKE  # more names wait behind these
        limit = self._per_request * self._concurrency * 4
        work += self._verifier.check_due(now_ms) + self._limits.past_limit(now_ms, limit)  # 5, 6
        batch = self._first_attempts(now_ms, limit)  # 7
        work += len(batch)  # also pushes settled without a request: more may wait behind them
        to_send = [p for p in batch if p.attempted]
        self._alerts.report(now_ms)
        if work:  # not idle any more, already while the requests go out
            self._metrics.stripe_idle.set(0)
        try:
            work += self._send_alone(now_ms)  # 8: suspects first, each by itself
            try:
                work += self._send(to_send)  # 8
            except RETRIED:  # an answer, no crash: what a dead sender left is counted back
                self._suspects.answered(self._again, self._now_ms())
                raise
            outbox.tidy(self._store)  # 9: the open work stays the open work
            if taken.names:  # only a cycle that planned names adds planned ones
                queue.tidy(self._store)
        finally:
            # also while Stripe fails: the backlog is what alerts watch
            self._alerts.report(self._now_ms())
            self._sender.trouble.report()
        return work

    def _verify_meters(self) -> None:
        """Nothing is sent until Stripe holds the billed meters as configured: a mismatch
        stops the emitter loudly (MeterMismatch); Stripe being unreachable is retried."""
        assert self._check is not None
        try:
            self._check()
        except (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError) as exc:
            raise SendFailed(f"cannot read Stripe's meters yet: {exc}") from exc
        self._check = None

    def _plan(self, now_ms: int, taken: queue.Taken) -> int:
        """Write aggregated deltas of the buckets `taken` names as new intents; only written
        intents are ever sent."""
        planned = []
        since = now_ms - self._lookback_ms
        cuts = anchors(self._anchor, self._period, since - DAY_MS, now_ms + DAY_MS)
        for meter in self._aggregated:
            check = meter.name not in self._bucketing_checked
            keys = taken.buckets(meter, cuts, since)
            planned += outbox.plan_aggregated(self._store, meter, since, cuts, check, keys)
            self._bucketing_checked.add(meter.name)
        if planned:
            self._fence()
        outbox.write(self._store, planned, outbox.PENDING, now_ms)
        return len(planned)

    def _first_attempts(self, now_ms: int, limit: int) -> list[Push]:
        """What may be sent now, with first_attempt_at written for the never-sent ones before
        they go: from then on their outcome counts as unknown. Some are settled as they are
        (nothing whole to send, or refused): only the attempted ones are sent."""
        # Re-sends the checks allowed and re-dated pushes carry a fresh first attempt now,
        # so they come back with the rest of what may be sent.
        batch = outbox.sendable(
            self._store,
            self._policy.limit_ms(now_ms),
            self._policy.blind_after_ms(now_ms),
            limit,
        )
        # What a dead sender left in flight is counted, and suspects go alone (unanswered.py).
        screened = self._suspects.screen(batch, now_ms)
        if screened.aside:  # held pushes move carries: read them afresh
            self._assigner.forget()
        self._alone, self._again = screened.alone, screened.again
        if self._alone:  # nothing else starts while a suspect may crash the process
            return []
        batch = screened.rest
        # The amount each sends is fixed in the same insert (units.py): a re-send repeats it.
        fresh = self._assigner.assign([p for p in batch if not p.attempted], ATTEMPTED, now_ms)
        if batch or screened.again:
            self._fence()
        # first_attempt_at, and the count of what a dead sender left, before sending
        outbox.write_moved(self._store, [*fresh, *screened.again], now_ms)
        recorded = {p.identifier: p for p in fresh}
        again = [with_count(p, 0) for p in screened.again]  # its mark carries no count
        return [*again, *(recorded.get(p.identifier, p) for p in batch)]

    # -- 8: send and mark ------------------------------------------------------------------

    def _beat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.beat()

    def _more(self) -> list[Push]:
        """Never-sent pushes to top the queue up with, first attempts written first."""
        self._beat()  # a long send is progress while its requests are answered
        limit = self._per_request * self._concurrency * 4
        for _ in range(3):  # a batch may settle entirely without requests (nothing whole)
            now_ms = self._now_ms()
            batch = self._ahead.take(limit, self._policy.limit_ms(now_ms))
            try:
                if batch:
                    self._fence()
            except Deposed as exc:  # requests under way finish; no new one starts
                self._deposed = exc
                return []
            fresh = self._assigner.assign(batch, ATTEMPTED, now_ms)
            outbox.write_moved(self._store, fresh, now_ms)
            attempted = [p for p in fresh if p.attempted]
            if attempted or not fresh:
                return attempted
        return []

    def _send_alone(self, now_ms: int) -> int:
        """Send each suspect by itself, its unanswered send counted first (unanswered.py)."""
        suspects, self._alone = self._alone, []
        if suspects:
            log.warning("sending %d pushes left attempted by a stopped sender alone", len(suspects))
        for p in suspects:
            if self.stopping.is_set():
                break
            self._beat()
            self._fence()
            self._suspects.send_alone(p, self._deliver_one, now_ms, RETRIED)
        return len(suspects)

    def _deliver_one(self, p: Push) -> None:
        if not self._marks.write(self._sender.send([p])):
            self._marks.raise_if_kept()

    def _send(self, batch: list[Push]) -> int:
        self._dispatch.stopping = self.stopping
        self._ahead.clear()  # read afresh each cycle: the steps before sending move pushes
        self._deposed = None
        topped = self._dispatch.run(batch, self._more)
        if self._deposed is not None:
            raise self._deposed
        return topped

    def drained_since(self, cycle: int) -> bool:
        """True once a cycle that started after `cycle` found nothing to plan or send."""
        return self.last_idle_cycle > cycle

    def run(self, stop: threading.Event) -> None:
        """Loop until `stop`; transient Stripe or ClickHouse failures back off and retry."""
        self.stopping = stop
        backoff = self._poll
        held: int | None = None  # the lease epoch the overbilled totals and carries were read under
        while not stop.is_set():
            self._beat()
            try:
                epoch = self._lease.hold() if self._lease is not None else 0
                if epoch is None:  # another process is the store's emitter: only it can
                    self._metrics.stripe_idle.set(0)  # say whether the outbox is idle
                    stop.wait(self._poll)
                    continue
                if epoch != held:  # another process may have emitted meanwhile
                    self._corrector.held_anew()
                    self._suspects.held_anew()
                    self._assigner.forget()
                    held = epoch
                worked = self.run_once()
                backoff = self._poll
            except Deposed as exc:
                log.warning("emitter stopped sending: %s", exc)
                self._metrics.stripe_idle.set(0)
                stop.wait(self._poll)
                continue
            except (SendFailed, StoreUnavailable, LeaseUnavailable) as exc:  # RETRIED
                # A StoreBug (and any other error) ends the thread, and the process with it.
                log.warning("emitter cycle failed, retrying: %s", exc)
                # one label for ClickHouse as before the kinds: dashboards and docs name it
                kind = "StoreError" if type(exc) is StoreUnavailable else type(exc).__name__
                self._metrics.emitter_failures.labels(kind).inc()
                if isinstance(exc, StoreUnavailable):
                    self._metrics.clickhouse_errors.labels("emitter").inc()
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if not worked:
                stop.wait(self._poll)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._lease is not None:
            self._lease.close()
