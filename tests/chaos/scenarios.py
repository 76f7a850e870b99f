"""The chaos matrix: the CI-sized run (part of `make test`: 22 random kills plus every kill
point) and the full one (`make chaos`: 220 random kills plus every point five times)."""

from __future__ import annotations

from tests.chaos.harness import POINTS, REDRIVE_POINTS, Scenario

STRIPE_FAULTS = {
    "rate_429": 0.05,
    "rate_5xx": 0.05,
    "latency_seconds": 0.005,  # a mean: concurrent requests finish out of order
    "reset_rate": 0.03,  # stored, then the connection reset before the answer
    "duplicate_answer": "reject_request",
}


def matrix(full: bool, seed: int) -> list[Scenario]:
    kills = 10 if full else 1
    events = 60_000 if full else 12_000
    return [
        Scenario(
            "kill-points",
            events,
            kill_points=POINTS * (5 if full else 1),
            random_kills=2 * kills,
            emulator={"token_lifetime_seconds": 4.0},
            # A wave is several batches, so a point's 2nd or 3rd occurrence comes too.
            env={"USAGE_CONSUMER_PIPELINE__BATCH_MAX_MESSAGES": "250"},
        ),
        Scenario("random-kills", events, random_kills=12 * kills, emulator=STRIPE_FAULTS),
        Scenario(
            "clickhouse-faults",
            # every statement may fail and back off: the slowest scenario per event, halved
            # in CI (about 170 s at 12,000 events) for make test's budget
            events if full else events // 2,
            random_kills=3 * kills,
            store_faults=f"rate=0.03,timeout=0.003,seed={seed}",
        ),
        Scenario("broker-pause", events, random_kills=2 * kills, pause_broker_seconds=5.0),
        Scenario(
            "session-expiry",
            events,
            random_kills=3 * kills,
            emulator={"token_lifetime_seconds": 3.0},
            expire_sessions_every=1.0,
        ),
        # Messages that crash the process on every attempt: found and quarantined (P7).
        Scenario("poison", events // 2, random_kills=kills, poison=5 if full else 1),
        # Every restart re-forms what the kill left open while the schema registry is down
        # and the host clock has jumped hours either way: same classes, nothing dead-lettered.
        Scenario(
            "retry-conditions",
            events // 2,
            # A kill inside the first adjustment (clock 3 hours behind), finished by a
            # process whose clock reads a day later. One intent a start (one batch a wave).
            kill_points=(
                "after_intent:1",
                "after_write_usage_events:1",
                "after_stripe_adjustment:1",
                "after_done:1",  # a 2nd or 3rd never comes in a start's one batch
            )
            * kills,
            random_kills=kills,
            registry_outage=4.0,
            clock_skews=(0.0, 3 * 3600.0, -3 * 3600.0, 26 * 3600.0),
        ),
        # Two instances in one process on one store, each owning some of six partitions; 5%
        # of the events also come re-stamped in the next partition, so both instances
        # classify copies of one event at once (one process: they share the kills).
        Scenario(
            "two-instances",
            events // 2,
            random_kills=4 * kills,
            partitions=6,
            instances=2,
            restamped=0.05,
            # each wave produced while the process runs: both instances read at the head,
            # so an event's two copies are classified at about the same time
            trickle=True,
            emulator=STRIPE_FAULTS,
        ),
        # Three processes on one store (its HTTP endpoint), each with its own ledger lock;
        # re-stamped copies in the next partition race across processes (sinks/copies.py
        # settles them). Each cycle SIGKILLs one, or kills the emitter's, lets one leave,
        # makes one a zombie, or cuts the namespace's replica off and heals it.
        Scenario(
            "replicas",
            events // 2,
            random_kills=6 * kills,
            partitions=6,
            processes=3,
            restamped=0.05,
            trickle=True,
            emulator=STRIPE_FAULTS,
            replica_faults=True,
        ),
        # Dead letters re-driven once their meter is configured (`dlq redrive`), the
        # re-drive and the consumer killed in turn: every event counted once. At the CI
        # size (6,000 events, each point once + 2 random) about a minute.
        redrive(events // 2, points=3 if full else 1, random_kills=6 if full else 2),
        # The ClickHouse edges below: in the full run here, in the CI run by their own test.
        *(clickhouse_edges() if full else []),
    ]


def redrive(events: int, points: int = 3, random_kills: int = 6) -> Scenario:
    return Scenario(
        "redrive",
        events,
        kill_points=REDRIVE_POINTS * points,
        random_kills=random_kills,
        redrive="tokens",
        env={"USAGE_CONSUMER_PIPELINE__BATCH_MAX_MESSAGES": "500"},
    )


# ClickHouse edges (tests/integration/test_clickhouse_edges.py; `make chaos` runs them too).
# Tables whose inserts carry an insert_deduplication_token (their dedup window is set).
DEDUP_TABLES = ("usage_events", "usage_windows", "dead_letters", "late_events", "stripe_pushes")
MAX_BLOCK_SIZE = 65_409  # ClickHouse's default max_block_size: INSERT ... SELECT splits here


NO_LEDGER_MERGES = (
    "ALTER TABLE usage_events MODIFY SETTING max_bytes_to_merge_at_max_space_in_pool = 1, "
    "max_bytes_to_merge_at_min_space_in_pool = 1"
)


def tiny_dedup_window() -> tuple[str, ...]:
    return tuple(
        f"ALTER TABLE {t} MODIFY SETTING non_replicated_deduplication_window = 1"
        for t in DEDUP_TABLES
    )


def window_overrun() -> tuple[str, ...]:
    """Between a kill and the restart, another writer's insert into every token-guarded
    table (a copy of one row as it currently reads, so converging by key is all it needs):
    with a window of one block, the crashed batch's token is gone before its retry."""
    return tuple(
        f"INSERT INTO {t} SELECT * FROM {t} FINAL LIMIT 1 "
        "SETTINGS insert_deduplication_token = 'other-writer'"
        for t in DEDUP_TABLES
    )


def clickhouse_edges(events: int = 9_000, big: int = 70_000) -> list[Scenario]:
    return [
        # Small batches, each run killed on its third: two batches are written before the
        # crashed one, and more inserts than the (one-block) dedup window come between a
        # write and its retry. The ledger keeps every physical row (merges off), so the test
        # can see that the retries landed again and still count once.
        Scenario(
            "dedup-window-1",
            events,
            kill_points=(
                "after_write_usage_events",
                "after_write_stripe_pushes",
                "after_insert",
                "after_done",
            ),
            kill_at=3,
            env={"USAGE_CONSUMER_PIPELINE__BATCH_MAX_MESSAGES": "400"},
            store_setup=(*tiny_dedup_window(), NO_LEDGER_MERGES),
            between_kills=window_overrun(),
        ),
        # One partition, all data there before the first start, and a batch size that makes
        # the first range hold more than MAX_BLOCK_SIZE accepted events (and, with this many
        # customers, about as many minute windows). Killed after its ledger insert, then
        # after the whole insert step of its re-form, then after its done row; drained.
        Scenario(
            "big-range",
            big,
            kill_points=("after_write_usage_events", "after_insert", "after_done"),
            partitions=1,
            customers=5_000,
            waves=1,
            kill_at=1,
            env={
                "USAGE_CONSUMER_PIPELINE__BATCH_MAX_MESSAGES": str(big * 69 // 70),
                "USAGE_CONSUMER_PIPELINE__BATCH_MAX_SECONDS": "8",
            },
        ),
    ]
