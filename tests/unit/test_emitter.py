"""Emitter pieces without a network: Sender, TokenBucket, SessionKeeper and payload shapes."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
import stripe
from hypothesis import given
from hypothesis import strategies as st

from consumer.clock import ManualClock
from consumer.emitter.plan.outbox import Push
from consumer.emitter.send import sender as sender_module
from consumer.emitter.send.ratelimit import TokenBucket
from consumer.emitter.send.sender import Sender, SendFailed, rfc3339, to_events
from consumer.emitter.send.session import SessionKeeper
from consumer.exact import exact
from consumer.metrics import Metrics

START = 1_700_000_000.0
SESSION_SECONDS = 900
BASES = {"api": "http://stripe.invalid", "meter_events": "http://stripe.invalid"}


def iso_z(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class Livelock(Exception):
    pass


class RecordingClock(ManualClock):
    """Records every sleep; fails instead of spinning forever if a waiter never stops."""

    def __init__(self, start: float = START) -> None:
        super().__init__(start)
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        if len(self.sleeps) > 100_000:
            raise Livelock(f"{len(self.sleeps)} sleeps, last {seconds!r}s at {self.monotonic()}")
        self.sleeps.append(seconds)
        super().sleep(seconds)


class FakeSessionApi:
    """Stands in for StripeClient: `.v2.billing.meter_event_session.create()`."""

    def __init__(self, clock: ManualClock, lifetime: float = SESSION_SECONDS) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.created = 0
        self.before_create: Callable[[], None] | None = None
        self.v2 = SimpleNamespace(
            billing=SimpleNamespace(meter_event_session=SimpleNamespace(create=self.create))
        )

    def create(self) -> SimpleNamespace:
        if self.before_create is not None:
            self.before_create()
        self.created += 1
        return SimpleNamespace(
            authentication_token=f"tok{self.created}",
            expires_at=iso_z(self.clock.now() + self.lifetime),
        )


Behaviour = Callable[[str, list[dict[str, Any]]], None]


@dataclass
class FakeStripe:
    """The meter event stream: records every request; `behaviour` may raise."""

    behaviour: Behaviour | None = None
    requests: list[tuple[str, list[str]]] = field(default_factory=list)
    delivered: list[str] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)
    options: list[dict[str, Any]] = field(default_factory=list)

    def client(self, token: str, bases: dict[str, str]) -> SimpleNamespace:
        assert bases == BASES
        self.clients.append(token)

        def create(params: dict[str, Any], options: dict[str, Any] | None = None) -> None:
            events = params["events"]
            self.requests.append((token, [e["identifier"] for e in events]))
            self.options.append(dict(options or {}))
            if self.behaviour is not None:
                self.behaviour(token, events)
            self.delivered += [e["identifier"] for e in events]

        stream = SimpleNamespace(create=create)
        return SimpleNamespace(
            v2=SimpleNamespace(billing=SimpleNamespace(meter_event_stream=stream))
        )


@dataclass
class Rig:
    clock: RecordingClock
    api: FakeSessionApi
    stripe: FakeStripe
    metrics: Metrics
    keeper: SessionKeeper

    def sender(self, max_retries: int = 8, rng: random.Random | None = None) -> Sender:
        limiter = TokenBucket(1e9, self.clock, burst=1e9)  # never waits
        return Sender(self.keeper, BASES, self.clock, limiter, self.metrics, max_retries, rng=rng)

    def requests(self, status: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "usage_consumer_stripe_requests_total", {"status": status}
        )
        return value or 0.0

    def count(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(f"usage_consumer_{name}_total")
        return value or 0.0

    def sessions(self, cause: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "usage_consumer_stripe_session_refreshes_total", {"cause": cause}
        )
        return value or 0.0


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    clock = RecordingClock()
    api = FakeSessionApi(clock)
    fake = FakeStripe()
    monkeypatch.setattr(sender_module, "stripe_client", fake.client)
    metrics = Metrics()
    keeper = SessionKeeper(api, clock, 120.0, metrics)  # type: ignore[arg-type]
    yield Rig(clock, api, fake, metrics, keeper)


def push(i: int, value: str = "1.5", bucket_ms: int = 1_700_000_000_000) -> Push:
    return Push(
        identifier=f"id-{i}",
        mode="per_event",
        meter="tokens",
        stripe_event_name="tokens",
        customer_id=f"cus_{i}",
        bucket_ms=bucket_ms,
        revision=0,
        value=Decimal(value),
        first_attempt_ms=0,
    )


def invalid_request(
    message: str, code: str | None, json_code: str | None = None, param: str | None = None
) -> stripe.InvalidRequestError:
    """A 400 as the SDK raises it (the SDK leaves this constructor unannotated)."""
    body = {"error": {"code": json_code or code, "type": "invalid_request_error"}}
    err: stripe.InvalidRequestError = stripe.InvalidRequestError(  # type: ignore[no-untyped-call]
        message, param=param, code=code, http_status=400, json_body=body
    )
    return err


def duplicate_error() -> stripe.InvalidRequestError:
    return invalid_request("An event with this identifier already exists", "duplicate_meter_event")


def connection_error() -> stripe.APIConnectionError:
    err: stripe.APIConnectionError = stripe.APIConnectionError(  # type: ignore[no-untyped-call]
        "connection reset", should_retry=True
    )
    return err


def rate_limited(retry_after: str | None = None) -> stripe.RateLimitError:
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return stripe.RateLimitError("Too many requests", http_status=429, headers=headers)


def failing(*errors: Exception) -> Behaviour:
    """Raise the given errors on the first requests, then succeed."""
    pending = list(errors)

    def behaviour(token: str, events: list[dict[str, Any]]) -> None:
        if pending:
            raise pending.pop(0)

    return behaviour


# --- Sender ----------------------------------------------------------------------------


def test_2xx_delivers_the_whole_request_in_one_call(rig: Rig) -> None:
    pushes = [push(i) for i in range(5)]
    assert rig.sender().send(pushes) == pushes
    assert rig.stripe.requests == [("tok1", [p.identifier for p in pushes])]
    assert rig.clock.sleeps == []
    assert rig.requests("200") == 1


def test_request_events_are_the_pushes_as_stripe_meter_events(rig: Rig) -> None:
    seen: list[list[dict[str, Any]]] = []
    rig.stripe.behaviour = lambda token, events: seen.append(events)
    rig.sender().send([push(1, "0.500", bucket_ms=1_700_000_000_007)])
    assert seen == [
        [
            {
                "event_name": "tokens",
                "identifier": "id-1",
                "timestamp": "2023-11-14T22:13:20.007Z",
                "payload": {"stripe_customer_id": "cus_1", "value": "0.5"},
            }
        ]
    ]


def test_duplicate_400_naming_nothing_halves_a_request_without_uncertain_pushes(rig: Rig) -> None:
    pushes = [push(i) for i in range(8)]
    already = {"id-0", "id-5"}

    def reject_duplicates(token: str, events: list[dict[str, Any]]) -> None:
        if any(e["identifier"] in already for e in events):
            raise duplicate_error()

    rig.stripe.behaviour = reject_duplicates
    assert rig.sender().send(pushes) == pushes
    # [0-7]x -> [0-3]x -> [0,1]x -> [0]dup [1]ok ; [2,3]ok
    #         -> [4-7]x -> [4,5]x -> [4]ok [5]dup ; [6,7]ok
    assert [r[1] for r in rig.stripe.requests] == [
        [f"id-{i}" for i in range(8)],
        ["id-0", "id-1", "id-2", "id-3"],
        ["id-0", "id-1"],
        ["id-0"],
        ["id-1"],
        ["id-2", "id-3"],
        ["id-4", "id-5", "id-6", "id-7"],
        ["id-4", "id-5"],
        ["id-4"],
        ["id-5"],
        ["id-6", "id-7"],
    ]
    # Every event not already held was delivered exactly once.
    assert sorted(rig.stripe.delivered) == sorted(f"id-{i}" for i in range(8) if i not in (0, 5))
    assert rig.count("stripe_duplicate_requests") == 7
    assert rig.count("stripe_duplicate_events") == 2
    assert rig.requests("400") == 7
    assert rig.requests("200") == 4
    assert rig.clock.sleeps == []


def naming(already: set[str], names: str) -> Behaviour:
    """Stripe rejecting a whole request that repeats an identifier of `already`, its message
    naming all, the first or none of the repeated ones."""

    def behaviour(token: str, events: list[dict[str, Any]]) -> None:
        repeated = [e["identifier"] for e in events if e["identifier"] in already]
        if not repeated:
            return
        shown = {"all": repeated, "first": repeated[:1], "none": []}[names]
        text = f"An event already exists with identifier {', '.join(shown)}." if shown else "dup"
        raise invalid_request(text, "duplicate_meter_event")

    return behaviour


def test_named_duplicates_are_delivered_and_the_rest_goes_in_one_request(rig: Rig) -> None:
    pushes = [push(i) for i in range(8)]
    rig.stripe.behaviour = naming({"id-2", "id-5"}, "all")
    assert rig.sender().send(pushes) == pushes
    assert len(rig.stripe.requests) == 2
    assert rig.stripe.requests[1][1] == [f"id-{i}" for i in range(8) if i not in (2, 5)]
    assert rig.count("stripe_duplicate_requests") == 1
    assert rig.count("stripe_duplicate_events") == 2


def test_first_named_duplicate_costs_one_request_each(rig: Rig) -> None:
    pushes = [push(i) for i in range(8)]
    rig.stripe.behaviour = naming({"id-2", "id-5"}, "first")
    assert rig.sender().send(pushes) == pushes
    assert [len(r[1]) for r in rig.stripe.requests] == [8, 7, 6]
    assert sorted(rig.stripe.delivered) == sorted(f"id-{i}" for i in range(8) if i not in (2, 5))


def test_unnamed_duplicates_isolate_only_pushes_whose_earlier_send_had_no_answer(
    rig: Rig,
) -> None:
    sender = rig.sender()  # started now: pushes first attempted earlier are uncertain
    earlier = int(START * 1000) - 60_000
    pushes = [push(i)._replace(first_attempt_ms=earlier if i in (1, 6) else 0) for i in range(8)]
    rig.stripe.behaviour = naming({"id-6"}, "none")
    assert sender.send(pushes) == pushes
    assert [r[1] for r in rig.stripe.requests] == [
        [f"id-{i}" for i in range(8)],
        [f"id-{i}" for i in range(8) if i not in (1, 6)],
        ["id-1"],
        ["id-6"],
    ]
    assert sorted(rig.stripe.delivered) == sorted(f"id-{i}" for i in range(8) if i != 6)
    assert rig.count("stripe_duplicate_events") == 1


def test_a_reset_request_is_uncertain_for_the_rest_of_the_process(rig: Rig) -> None:
    sender = rig.sender(max_retries=2)
    first = [push(i) for i in range(3)]
    rig.stripe.behaviour = failing(*[connection_error()] * 3)
    with pytest.raises(SendFailed):
        sender.send(first[:1])  # three resets: Stripe may hold it
    rig.stripe.requests.clear()
    rig.stripe.behaviour = naming({"id-0"}, "none")
    assert sender.send(first) == first
    assert [r[1] for r in rig.stripe.requests] == [
        ["id-0", "id-1", "id-2"],
        ["id-1", "id-2"],
        ["id-0"],
    ]


def test_idempotency_key_is_kept_across_retries_and_differs_by_content(rig: Rig) -> None:
    rig.stripe.behaviour = failing(connection_error(), rate_limited())
    sender = rig.sender()
    sender.send([push(1), push(2)])
    keys = [o["idempotency_key"] for o in rig.stripe.options]
    assert len(keys) == 3 and len(set(keys)) == 1
    sender.send([push(1), push(2)])
    sender.send([push(1)])
    sender.send([push(1), push(2)._replace(first_attempt_ms=5)])  # a deliberate re-send
    later = [o["idempotency_key"] for o in rig.stripe.options[3:]]
    assert later[0] == keys[0]
    assert len({keys[0], *later[1:]}) == 3
    assert all(len(k) <= 255 for k in keys + later)


def test_duplicate_identifier_code_read_from_the_json_body(rig: Rig) -> None:
    err = invalid_request("dup", code=None, json_code="duplicate_identifier")
    assert err.code is None
    rig.stripe.behaviour = failing(err)
    assert rig.sender().send([push(1)]) == [push(1)]
    assert len(rig.stripe.requests) == 1
    assert rig.stripe.delivered == []


def test_non_duplicate_400_raises(rig: Rig) -> None:
    err = invalid_request("bad value", "parameter_invalid", param="events[0].payload.value")
    rig.stripe.behaviour = failing(err)
    with pytest.raises(stripe.InvalidRequestError) as info:
        rig.sender().send([push(i) for i in range(4)])
    assert info.value is err
    assert len(rig.stripe.requests) == 1  # neither split nor retried
    assert rig.clock.sleeps == []


def test_other_authentication_error_raises(rig: Rig) -> None:
    err = stripe.AuthenticationError(
        "bad key", http_status=401, json_body={"error": {"code": "api_key_expired"}}
    )
    rig.stripe.behaviour = failing(err)
    with pytest.raises(stripe.AuthenticationError):
        rig.sender().send([push(1)])
    assert rig.api.created == 1


@pytest.mark.parametrize(
    "make_error",
    [
        lambda: rate_limited(),
        lambda: stripe.APIError("boom", http_status=500),
        lambda: stripe.APIError("unavailable", http_status=503),
        connection_error,
    ],
    ids=["429", "500", "503", "connection"],
)
def test_transient_errors_retry_with_growing_jittered_backoff(
    rig: Rig, make_error: Callable[[], stripe.StripeError]
) -> None:
    rng_seed = 1234
    rig.stripe.behaviour = failing(*(make_error() for _ in range(5)))
    pushes = [push(1), push(2)]
    assert rig.sender(rng=random.Random(rng_seed)).send(pushes) == pushes
    assert len(rig.stripe.requests) == 6
    assert rig.stripe.delivered == ["id-1", "id-2"]
    mirror = random.Random(rng_seed)
    bases = [0.25, 0.5, 1.0, 2.0, 4.0]
    expected = [b * mirror.uniform(0.5, 1.0) for b in bases]
    assert rig.clock.sleeps == expected
    for slept, base in zip(rig.clock.sleeps, bases, strict=True):
        assert 0.5 * base <= slept <= base
    assert rig.clock.sleeps == sorted(rig.clock.sleeps)  # growing
    assert len(set(rig.clock.sleeps)) == len(bases)


class Extremes(random.Random):
    def __init__(self, pick_high: bool) -> None:
        super().__init__(0)
        self.pick_high = pick_high

    def uniform(self, a: float, b: float) -> float:
        return b if self.pick_high else a


@pytest.mark.parametrize("high", [False, True])
def test_backoff_doubles_and_is_capped_at_30s(rig: Rig, high: bool) -> None:
    rig.stripe.behaviour = failing(*(stripe.APIError("x", http_status=502) for _ in range(10)))
    rig.sender(max_retries=10, rng=Extremes(high)).send([push(1)])
    full = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert rig.clock.sleeps == [b if high else b / 2 for b in full]
    assert rig.clock.monotonic() == sum(rig.clock.sleeps)


def test_retry_after_header_is_honoured(rig: Rig) -> None:
    rig.stripe.behaviour = failing(rate_limited("7"), rate_limited("0"), rate_limited("soon"))
    rig.sender(rng=Extremes(pick_high=True)).send([push(1)])
    # The hint is a floor: 7 s beats 0.25 s; "0" and garbage fall back to the backoff.
    assert rig.clock.sleeps == [7.0, 0.5, 1.0]


def test_lowercase_retry_after_header(rig: Rig) -> None:
    err = stripe.RateLimitError("slow down", http_status=429, headers={"retry-after": "2.5"})
    rig.stripe.behaviour = failing(err)
    rig.sender(rng=Extremes(pick_high=False)).send([push(1)])
    assert rig.clock.sleeps == [2.5]


def test_gives_up_after_max_retries_with_send_failed(rig: Rig) -> None:
    errors = [stripe.APIError("down", http_status=503) for _ in range(10)]
    rig.stripe.behaviour = failing(*errors)
    with pytest.raises(SendFailed, match="503") as info:
        rig.sender(max_retries=3).send([push(1)])
    assert info.value.__cause__ is errors[3]
    assert len(rig.stripe.requests) == 4  # the first try and 3 retries
    assert len(rig.clock.sleeps) == 3
    assert rig.stripe.delivered == []
    assert rig.requests("503") == 4


def test_zero_retries_fails_at_once(rig: Rig) -> None:
    rig.stripe.behaviour = failing(rate_limited())
    with pytest.raises(SendFailed):
        rig.sender(max_retries=0).send([push(1)])
    assert rig.clock.sleeps == []


def _session_expired_errors() -> list[stripe.StripeError]:
    return [
        stripe.TemporarySessionExpiredError(
            "session expired",
            http_status=401,
            json_body={"error": {"code": "temporary_session_expired"}},
            code="temporary_session_expired",
        ),
        stripe.AuthenticationError(
            "session expired",
            http_status=401,
            json_body={"error": {"code": "billing_meter_event_session_expired", "type": "x"}},
        ),
    ]


@pytest.mark.parametrize("which", [0, 1], ids=["temporary_session_expired", "auth_expired"])
def test_session_expiry_refreshes_once_and_retries(rig: Rig, which: int) -> None:
    rig.stripe.behaviour = failing(_session_expired_errors()[which])
    pushes = [push(1), push(2)]
    assert rig.sender().send(pushes) == pushes
    assert [t for t, _ in rig.stripe.requests] == ["tok1", "tok2"]
    assert rig.api.created == 2
    assert rig.sessions("start") == 1
    assert rig.sessions("expired") == 1
    assert rig.requests("session_expired") == 1
    assert rig.stripe.delivered == ["id-1", "id-2"]
    assert rig.clock.sleeps == []


def test_sender_refreshes_the_session_ahead_of_expiry(rig: Rig) -> None:
    s = rig.sender()
    s.send([push(1)])
    rig.clock.advance(SESSION_SECONDS - 120 - 1)
    s.send([push(2)])
    rig.clock.advance(1)
    s.send([push(3)])
    assert [t for t, _ in rig.stripe.requests] == ["tok1", "tok1", "tok2"]
    assert rig.stripe.clients == ["tok1", "tok2"]  # one client per token
    assert rig.sessions("scheduled") == 1


# --- SessionKeeper ---------------------------------------------------------------------


def keeper(margin: float = 120.0) -> tuple[SessionKeeper, FakeSessionApi, ManualClock, Metrics]:
    clock = ManualClock(START)
    api = FakeSessionApi(clock)
    metrics = Metrics()
    return SessionKeeper(api, clock, margin, metrics), api, clock, metrics  # type: ignore[arg-type]


def test_keeper_creates_a_session_lazily_and_reuses_it() -> None:
    k, api, clock, _ = keeper()
    assert api.created == 0
    assert k.token() == "tok1"
    clock.advance(100)
    assert k.token() == "tok1"
    assert api.created == 1


@pytest.mark.parametrize("margin", [0.0, 120.0, 600.5])
def test_keeper_refreshes_exactly_margin_seconds_before_expiry(margin: float) -> None:
    k, api, clock, metrics = keeper(margin)
    assert k.token() == "tok1"
    clock.advance(SESSION_SECONDS - margin - 0.001)
    assert k.token() == "tok1"
    clock.advance(0.001)
    assert k.token() == "tok2"
    assert api.created == 2
    sample = metrics.registry.get_sample_value(
        "usage_consumer_stripe_session_refreshes_total", {"cause": "scheduled"}
    )
    assert sample == 1.0


def test_keeper_follows_the_servers_expiry_not_a_fixed_lifetime() -> None:
    k, api, clock, _ = keeper(margin=10)
    api.lifetime = 60
    assert k.token() == "tok1"
    clock.advance(49)
    assert k.token() == "tok1"
    clock.advance(1)
    assert k.token() == "tok2"


def test_expired_with_the_current_token_refreshes_and_a_stale_one_does_not() -> None:
    k, api, _, _ = keeper()
    stale = k.token()
    k.expired(stale)
    assert k.token() == "tok2"
    k.expired(stale)  # a second report of the same stale token: already refreshed
    assert k.token() == "tok2"
    assert api.created == 2


def test_two_threads_reporting_the_same_stale_token_refresh_once() -> None:
    k, api, _, _ = keeper()
    stale = k.token()
    entered, release = threading.Event(), threading.Event()

    def slow_create() -> None:
        entered.set()
        assert release.wait(5)

    api.before_create = slow_create
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def report() -> None:
        try:
            barrier.wait(5)
            k.expired(stale)
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=report) for _ in range(2)]
    for t in threads:
        t.start()
    assert entered.wait(5)  # one thread is refreshing, holding the lock
    release.set()
    for t in threads:
        t.join(5)
    assert errors == []
    assert api.created == 2
    assert k.token() == "tok2"


def test_on_refresh_callback_runs_before_each_session_create() -> None:
    clock = ManualClock(START)
    api = FakeSessionApi(clock)
    calls: list[int] = []
    k = SessionKeeper(
        api,  # type: ignore[arg-type]
        clock,
        120,
        Metrics(),
        on_refresh=lambda: calls.append(api.created),
    )
    k.token()
    k.expired("tok1")
    assert calls == [0, 1]


# --- TokenBucket -----------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "n"), [(4.0, 9), (8.0, 81), (0.5, 5), (1024.0, 2049)])
def test_n_acquisitions_at_rate_r_take_n_over_r_seconds(rate: float, n: int) -> None:
    clock = RecordingClock(0.0)
    bucket = TokenBucket(rate, clock, burst=1.0)
    waited = [bucket.acquire() for _ in range(n)]
    # The first token is in the bucket; each further one takes exactly 1/R.
    assert clock.monotonic() == (n - 1) / rate
    assert waited == [0.0] + [1 / rate] * (n - 1)
    assert sum(waited) == clock.monotonic()


def test_default_burst_is_a_tenth_of_a_second_of_rate() -> None:
    clock = RecordingClock(0.0)
    bucket = TokenBucket(64.0, clock)  # burst 6.4
    waits = [bucket.acquire() for _ in range(6 + 64)]
    assert waits[:6] == [0.0] * 6
    assert clock.monotonic() == pytest.approx((70 - 6.4) / 64)


@pytest.mark.parametrize("rate", [20.0, 3.0, 25.0, 100.0])
def test_non_power_of_two_rate_takes_n_over_r(rate: float) -> None:
    clock = RecordingClock(0.0)
    bucket = TokenBucket(rate, clock, burst=1.0)
    for _ in range(201):
        bucket.acquire()
    assert clock.monotonic() == pytest.approx(200 / rate, rel=1e-9)


def test_idle_time_refills_only_up_to_the_burst() -> None:
    clock = RecordingClock(0.0)
    bucket = TokenBucket(4.0, clock, burst=2.0)
    assert [bucket.acquire() for _ in range(2)] == [0.0, 0.0]
    clock.advance(1000)  # far more than the burst's worth
    clock.sleeps.clear()
    assert [bucket.acquire() for _ in range(2)] == [0.0, 0.0]
    assert bucket.acquire() == 0.25
    assert clock.sleeps == [0.25]


def test_sender_waits_on_the_rate_limiter(rig: Rig) -> None:
    limiter = TokenBucket(2.0, rig.clock, burst=1.0)
    s = Sender(rig.keeper, BASES, rig.clock, limiter, rig.metrics, 0)
    for i in range(5):
        s.send([push(i)])
    assert rig.clock.monotonic() == 2.0
    waited = rig.metrics.registry.get_sample_value(
        "usage_consumer_stripe_rate_limit_wait_seconds_total"
    )
    assert waited == 2.0


# --- payload formats -------------------------------------------------------------------


def test_to_event_values_are_strings_and_timestamps_rfc3339() -> None:
    p = Push(
        identifier="uc1a_abc",
        mode="aggregated",
        meter="api_calls",
        stripe_event_name="api_calls",
        customer_id="cus_9",
        bucket_ms=1_700_000_040_000,
        revision=3,
        value=Decimal("1E+3"),
        first_attempt_ms=5,
    )
    assert to_events(p) == [
        {
            "event_name": "api_calls",
            "identifier": "uc1a_abc",
            "timestamp": "2023-11-14T22:14:00.000Z",
            "payload": {"stripe_customer_id": "cus_9", "value": "1000"},
        }
    ]


def test_an_amount_over_15_digits_goes_as_several_events_that_sum_to_it() -> None:
    p = Push("uc1e_x", "per_event", "m", "m", "cus_1", 0, 0, Decimal("12345678901234567.5"), 5)
    p = p.moved(p.status, sent=p.value)
    events = to_events(p, {"m": ("customer", "amount")})
    values = [e["payload"]["amount"] for e in events]
    assert sum(Decimal(v) for v in values) == p.value
    assert all(len(v.replace(".", "").lstrip("0")) <= 15 for v in values)
    assert [e["identifier"] for e in events] == ["uc1e_x"] + [
        f"uc1e_x-p{i}" for i in range(1, len(events))
    ]
    assert {e["payload"]["customer"] for e in events} == {"cus_1"}


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1, "1970-01-01T00:00:00.001Z"),
        (1_700_000_000_999, "2023-11-14T22:13:20.999Z"),
        (1_763_000_000_123, "2025-11-13T02:13:20.123Z"),
    ],
)
def test_rfc3339(ms: int, text: str) -> None:
    assert rfc3339(ms) == text


@given(st.integers(0, 253_402_300_799_999))
def test_rfc3339_round_trips_every_millisecond(ms: int) -> None:
    text = rfc3339(ms)
    assert len(text) == 24 and text.endswith("Z")
    parsed = datetime.fromisoformat(text)
    back = int(parsed.timestamp()) * 1000 + parsed.microsecond // 1000
    assert back == ms


def test_events_skip_the_sdks_form_encoding_and_keep_their_json_body() -> None:
    """The SDK form-encodes v2 params it never sends; a 100-event request spent most of its
    CPU there. If an SDK upgrade stops treating the list as one field, this fails."""
    import json

    from stripe._encode import _api_encode

    push = Push("id-1", "per_event", "m", "m", "cus_1", 1_763_000_000_123, 0, Decimal(2), 0)
    events = to_events(push) * 100
    wrapped = {"events": sender_module._Events(events)}
    assert list(_api_encode(wrapped)) == [("events", None)]
    assert json.dumps(wrapped) == json.dumps({"events": events})


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("1E+3", "1000"),
        ("0.500", "0.5"),
        ("100", "100"),
        ("1.000000000", "1"),
        ("0", "0"),
        ("0E-9", "0"),
        ("0.000000001", "0.000000001"),
        ("1E-9", "0.000000001"),
        ("1234567890123456789.123456789", "1234567890123456789.123456789"),  # 28 digits
        ("2.50E+2", "250"),
    ],
)
def test_exact_formats_without_exponent_or_trailing_zeros(value: str, text: str) -> None:
    assert exact(Decimal(value)) == text


@given(st.decimals(min_value=0, max_value=10**19 - 1, places=9, allow_nan=False))
def test_exact_is_a_plain_lossless_decimal_string(value: Decimal) -> None:
    text = exact(value)
    assert Decimal(text) == value
    assert "E" not in text and "e" not in text
    assert not ("." in text and text.endswith("0"))
    assert not text.endswith(".")


@pytest.mark.parametrize(
    "value",
    [
        "12345678901234567890.123456789",
        "10000000000000000000.000000001",
        "99999999999999999999999999999.999999999",  # the largest Decimal(38, 9)
    ],
)
def test_exact_is_lossless_for_every_decimal_38_9(value: str) -> None:
    assert exact(Decimal(value)) == value


def test_a_rate_far_above_what_is_sent_queues_at_most_max_ahead_requests() -> None:
    """A live key may be configured at 10,000 requests/s; while Stripe answers slowly the
    queue of requests must stay bounded, not grow to a second of that rate."""
    from concurrent.futures import ThreadPoolExecutor

    from consumer.clock import SystemClock
    from consumer.emitter.send.dispatch import MAX_AHEAD, Dispatch

    release = threading.Event()
    handed = 0
    stopping = threading.Event()

    def stop() -> None:
        stopping.set()
        release.set()

    class SlowSender:
        def send(self, chunk: list[Push]) -> list[Push]:
            release.wait(10)
            return []

    class NoMarks:
        def write(self, delivered: list[Push]) -> bool:
            return True

        def raise_if_kept(self) -> None:
            return None

    def more() -> list[Push]:  # 250 requests of 100 events each time
        nonlocal handed
        handed += 250
        if handed >= 10 * 250:  # far past the bound: stop rather than fill memory
            stop()
        return [
            Push(f"id-{handed}-{i}", "per_event", "m", "m", "c", 0, 0, Decimal(1), 1)
            for i in range(250 * 100)
        ]

    pool = ThreadPoolExecutor(2)
    sender: Any = SlowSender()
    marks: Any = NoMarks()
    dispatch = Dispatch(pool, sender, marks, SystemClock(), 100, 2, rate=10_000.0)
    dispatch.stopping = stopping

    def stop_once_settled() -> None:
        # Stop after the top-ups have reached the bound and then ceased for half a second
        # (however slow a loaded host builds the requests); a dispatch that kept topping up
        # would hit the hard stop in more() instead.
        deadline, last, since = time.monotonic() + 60, -1, time.monotonic()
        while not stopping.is_set() and time.monotonic() < deadline:
            if handed != last:
                last, since = handed, time.monotonic()
            elif handed >= MAX_AHEAD and time.monotonic() - since > 0.5:
                break
            time.sleep(0.01)
        stop()

    stopper = threading.Thread(target=stop_once_settled)
    stopper.start()
    try:
        dispatch.run(more(), more)
    finally:
        stop()
        stopper.join()
        pool.shutdown(wait=True)
    # topping up stops once MAX_AHEAD requests wait (two more are in flight); a second
    # of the configured rate would be 10,000
    assert MAX_AHEAD <= handed <= MAX_AHEAD + 250 + 2
