"""Keeps the configured number of requests in flight and marks what they delivered.

A cycle hands over its batch; while requests answer, the queue is topped up with the next
never-sent pushes (their first attempt and amount written first, as for the batch), so the
rate limiter, not the cycle's store round-trips, sets the pace. Marks are written after the
2xx, batched to one insert per MARK_EVERY: at hundreds of requests a second a mark per
request would cost more than the requests. The first answer is marked at once, so a store
that cannot take marks stops the sending early: requests not yet started are skipped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from consumer import crash_points
from consumer.clock import Clock
from consumer.emitter.plan.outbox import Push
from consumer.emitter.send.marks import Marks
from consumer.emitter.send.sender import Sender, SendFailed, event_count

MARK_EVERY = 0.2  # seconds between delivery-mark inserts while requests answer
TOP_UP_FOR = 15.0  # seconds a cycle keeps topping up before the next cycle's other steps
AHEAD = 1.0  # seconds of requests kept queued: a top-up takes a good part of a second
# Requests queued at most (50,000 events): a live key configured far above what one
# process sends must not queue a second of its rate in memory.
MAX_AHEAD = 500


def requests_of(batch: list[Push], per_request: int) -> list[list[Push]]:
    """Pushes grouped into requests of at most `per_request` meter events, each request for
    one account (the platform's or a connected account), in batch order within each."""
    chunks: list[list[Push]] = []
    for account in dict.fromkeys(p.account for p in batch):
        size = per_request
        for p in (p for p in batch if p.account == account):
            n = event_count(p)
            if size + n > per_request:
                chunks.append([])
                size = 0
            chunks[-1].append(p)
            size += n
    return chunks


class Dispatch:
    def __init__(
        self,
        pool: ThreadPoolExecutor,
        sender: Sender,
        marks: Marks,
        clock: Clock,
        per_request: int,
        concurrency: int,
        rate: float = 0.0,
    ) -> None:
        self._pool = pool
        self._sender = sender
        self._marks = marks
        self._clock = clock
        self._per_request = per_request
        self._concurrency = concurrency
        # Top up while fewer requests than this wait: at hundreds a second, waiting until
        # fewer than `concurrency` wait lets the queue run dry during the top-up itself.
        self._ahead = max(concurrency, min(int(rate * AHEAD), MAX_AHEAD))
        self.halt = threading.Event()  # a mark failed: start no more requests
        self.stopping = threading.Event()

    def _send_unless_stopping(self, chunk: list[Push]) -> list[Push]:
        """On shutdown or a failed mark, requests not yet started are skipped (they stay
        pending, attempted)."""
        if self.stopping.is_set() or self.halt.is_set():
            return []
        return self._sender.send(chunk)

    def run(self, batch: list[Push], more: Callable[[], list[Push]]) -> int:
        """Send `batch`, topping up from `more` while the queue runs low; returns how many
        pushes were topped up. Raises SendFailed (after marking what was delivered) when a
        request ran out of retries."""
        self.halt.clear()
        until = self._clock.monotonic() + TOP_UP_FOR
        pending: set[Future[list[Push]]] = set()
        topped = answers = 0
        failure: SendFailed | None = None
        answered: list[Push] = []  # delivered, mark not yet written
        last_mark = float("-inf")

        def submit(pushes: list[Push]) -> None:
            for chunk in requests_of(pushes, self._per_request):
                pending.add(self._pool.submit(self._send_unless_stopping, chunk))

        def mark() -> None:
            nonlocal answered, last_mark
            # Taken before writing: a mark the store refuses (StoreBug) is not written again
            # on the way out; one it cannot take now is kept by Marks for the next cycle.
            marks, answered, last_mark = answered, [], self._clock.monotonic()
            if marks and not self._marks.write(marks):
                self.halt.set()

        submit(batch)
        try:
            while pending:
                done, _ = wait(pending, timeout=0.05, return_when=FIRST_COMPLETED)
                for fut in done:
                    pending.discard(fut)
                    answers += 1
                    if answers == 2:
                        crash_points.reached("stripe_mid_batch")  # some requests answered, some not
                    try:
                        delivered = fut.result()
                    except SendFailed as exc:
                        failure = exc
                        continue
                    if delivered:
                        crash_points.reached("after_stripe_2xx")
                        answered += delivered
                if answered and self._clock.monotonic() - last_mark >= MARK_EVERY:
                    mark()
                queued = sum(not f.running() and not f.done() for f in pending)
                go_on = not (failure or self.halt.is_set() or self.stopping.is_set())
                if go_on and queued < self._ahead and self._clock.monotonic() < until:
                    extra = more()
                    topped += len(extra)
                    submit(extra)
                    if not extra:
                        until = float("-inf")  # the outbox has nothing more: stop asking
        finally:
            mark()
        self._marks.raise_if_kept()
        if failure is not None:
            raise failure
        return topped
