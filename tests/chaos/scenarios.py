"""The chaos matrix: the CI-sized run (part of `make test`: 22 random kills plus every kill
point) and the full one (`make chaos`: 220 random kills plus every point five times)."""

from __future__ import annotations

from tests.chaos.harness import POINTS, Scenario

STRIPE_FAULTS = {
    "rate_429": 0.05,
    "rate_5xx": 0.05,
    "latency_seconds": 0.005,
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
        ),
        Scenario("random-kills", events, random_kills=12 * kills, emulator=STRIPE_FAULTS),
        Scenario(
            "clickhouse-faults",
            events,
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
    ]
