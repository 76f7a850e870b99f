"""Runs every check at once, each in its own thread with one deadline, so an unreachable
service is a FAIL with its fix after the timeout, never a hang, and a check that fails or
raises never stops the others. Secrets are masked out of everything a check reports."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from consumer.clock import Clock
from consumer.config import Settings
from consumer.ops.doctor.report import Finding, Status, fail, worst
from consumer.ops.logs import MASK, secrets_of
from consumer.store import Backend, open_store

# What the runner waits beyond the checks' own client timeouts, so that a client's own
# error (more telling than "no answer") is what the row says when both are due.
GRACE_SECONDS = 1.0


class Env:
    """What the checks share: the settings, the clock, the timeout, and one store (chDB
    allows one opener per process), opened on first use in a thread of its own, so that a
    check reading it only by the way can stop waiting for a store that does not answer."""

    def __init__(self, settings: Settings, clock: Clock, timeout: float) -> None:
        self.settings = settings
        self.clock = clock
        self.timeout = timeout
        self._lock = threading.Lock()
        self._opened = threading.Event()
        self._opening = False
        self._store: Backend | None = None
        self._store_error: Exception | None = None

    def store(self, wait: float | None = None) -> Backend:
        """The store, waiting at most `wait` seconds (the timeout) for it to open; raises
        what opening it raised, or TimeoutError."""
        with self._lock:
            start, self._opening = not self._opening, True
        if start:
            threading.Thread(target=self._open, name="doctor store", daemon=True).start()
        wait = self.timeout if wait is None else wait
        if not self._opened.wait(wait):
            raise TimeoutError(f"ClickHouse gave no answer within {wait:g} s")
        if self._store_error is not None:
            raise self._store_error
        assert self._store is not None
        return self._store

    def _open(self) -> None:
        try:
            self._store = open_store(self.settings.clickhouse)
        except Exception as exc:
            self._store_error = exc
        finally:
            self._opened.set()

    def close(self) -> None:
        """Close the store if it opened (a store still opening is left to the process)."""
        if self._opened.is_set() and self._store is not None:
            self._store.close()
            self._store = None


@dataclass(frozen=True)
class Check:
    """A check's name (its row when it gives no answer), what it does, and the one action
    that mends it when its service cannot be reached or it raises."""

    name: str
    run: Callable[[Env], list[Finding]]
    unreachable: str


@dataclass
class _Slot:
    findings: list[Finding] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


def run_checks(checks: Sequence[Check], env: Env) -> list[Finding]:
    """Every check's findings in the order of `checks`."""
    slots = [_Slot() for _ in checks]

    def one(check: Check, slot: _Slot) -> None:
        try:
            slot.findings = check.run(env)
        except Exception as exc:  # a check's failure is its row, never the others' end
            slot.findings = [fail(check.name, _describe(exc), check.unreachable)]
        finally:
            slot.done.set()

    for check, slot in zip(checks, slots, strict=True):
        name = f"doctor {check.name}"
        threading.Thread(target=one, args=(check, slot), name=name, daemon=True).start()
    deadline = env.clock.monotonic() + env.timeout + GRACE_SECONDS
    out: list[Finding] = []
    for check, slot in zip(checks, slots, strict=True):
        if slot.done.wait(max(0.0, deadline - env.clock.monotonic())):
            out += slot.findings
        else:
            detail = f"no answer within {env.timeout:g} s"
            out.append(fail(check.name, detail, check.unreachable))
    if all(slot.done.is_set() for slot in slots):  # a hung check may still hold the store
        env.close()
    return [_masked(f, secrets_of(env.settings)) for f in out]


def _describe(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _masked(f: Finding, secrets: list[str]) -> Finding:
    detail, fix = f.detail, f.fix
    for secret in (s for s in secrets if len(s) >= 4):
        detail, fix = detail.replace(secret, MASK), fix.replace(secret, MASK)
    return Finding(f.check, f.status, detail, fix)


def exit_code(findings: Sequence[Finding], fail_on: Status = Status.WARN) -> int:
    """0 when every finding is below `fail_on`, else the worst status (1 WARN, 2 FAIL)."""
    found = worst(findings)
    return int(found) if found >= fail_on else 0
