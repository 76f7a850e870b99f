"""`usage-consumer push release IDENTIFIER`: give a quarantined push back to the emitter.

A push that crashed the emitter every time it was sent alone is held as rejected with the
reason `quarantined: ...` (consumer/emitter/send/unanswered.py). Once the cause is fixed
(a new version deployed), a person releases it: the quarantine row is deleted, and the
push is written back as attempted, with no unanswered send counted, so the next cycle
sends it again (or, past Stripe's 24-hour memory of identifiers, checks it against event
summaries first, as any attempted push). With the embedded store, run it while the
consumer is stopped.
"""

from __future__ import annotations

from consumer.emitter.plan import outbox
from consumer.emitter.plan.outbox import ATTEMPTED, COLUMNS, REDATED, REJECTED, Push, from_row
from consumer.emitter.send.unanswered import QUARANTINED
from consumer.store.backend import Backend


class NotQuarantined(Exception):
    """The identifier names no quarantined push."""


def release(store: Backend, identifier: str, now_ms: int) -> Push:
    """Release the quarantined push `identifier`; returns it as it is sent again."""
    rows = [
        from_row(r)
        for r in store.query(
            f"SELECT {COLUMNS} FROM stripe_pushes FINAL WHERE identifier = {{i:String}}",
            {"i": identifier},
        )
    ]
    if not rows or rows[0].status != REJECTED or not rows[0].reason.startswith(QUARANTINED):
        now = f"it is {outbox_status(rows[0])}" if rows else "no push has it"
        raise NotQuarantined(f"{identifier}: not a quarantined push ({now})")
    held = rows[0]
    # Only attempted pushes are quarantined; the row keeps their first attempt, the amount
    # they send and a re-dated timestamp (the rows before it may be merged away).
    before = held.moved(REDATED if held.stripe_ms else ATTEMPTED, reason="released")
    for table in ("stripe_pushes", "stripe_open"):  # the quarantine, and its hold's name
        rank = f" AND status_rank = {REJECTED}" if table == "stripe_pushes" else ""
        store.command(
            f"ALTER TABLE {table} DELETE WHERE identifier = {{i:String}}{rank} "
            "SETTINGS mutations_sync = 1",
            {"i": identifier},
        )
    outbox.write_moved(store, [before], now_ms)  # named open again, then the push
    return before


def outbox_status(p: Push) -> str:
    return f"status rank {p.status}" + (f", {p.reason}" if p.reason else "")
