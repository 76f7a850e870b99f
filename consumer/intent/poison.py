"""Poison ranges (P7): which range to form after a crash left an intent open.

A range whose intent is still open when its partition is next assigned crashed the process
(or was killed) while being written. Retrying it as is covers ordinary crashes. After
`limit` attempts it is narrowed: the crashed range becomes the *suspect* and is tried in
`SPLIT` consecutive chunks, each its own range with its own intent. A chunk that crashes
becomes the new, smaller suspect; a chunk that completes moves on to the next one. A
single-offset range that crashed `limit` times is quarantined: dead-lettered with reason
"poison" and never decoded again.

A stray kill only ever narrows the search; quarantining still needs `limit` crashes of one
offset on its own, so an innocent message is not quarantined by bad luck. Only crashes
before a re-formed range's records are classified count: past that point its attempt is
withdrawn, so a process that keeps dying later in its work (out of memory while writing,
killed by its orchestrator) never gets a valid message quarantined. Crashes needed to
find one poison message in a range of n offsets: about 2 * limit + log16(n).
"""

from __future__ import annotations

from dataclasses import dataclass

SPLIT = 16
Span = tuple[int, int]  # [start, end) offsets


@dataclass(frozen=True)
class Plan:
    """The next formation of a partition's range."""

    start: int
    end: int
    attempt: int
    suspect: Span | None = None
    quarantine: bool = False


def chunk(suspect: Span) -> int:
    """Offsets per chunk when searching `suspect`."""
    return max(1, -(-(suspect[1] - suspect[0]) // SPLIT))


def after_crash(start: int, end: int, attempt: int, suspect: Span | None, limit: int) -> Plan:
    """The range to form when [start, end), formed `attempt` times, left its intent open.
    Attempt 0: the crash came after the records were classified (the attempt was withdrawn),
    so it is retried as it was, searched no further."""
    if attempt < 1:
        return Plan(start, end, 1, suspect)
    if end - start <= 1:
        if attempt >= limit:
            return Plan(start, end, attempt + 1, quarantine=True)
        return Plan(start, end, attempt + 1, suspect)
    if suspect is None and attempt < limit:
        return Plan(start, end, attempt + 1)
    narrowed = (start, end)
    return Plan(start, start + chunk(narrowed), 1, narrowed)


def next_chunk(start: int, suspect: Span | None) -> Plan | None:
    """The chunk after a completed one, or None when the suspect is exhausted."""
    if suspect is None or start >= suspect[1]:
        return None
    return Plan(start, min(suspect[1], start + chunk(suspect)), 1, suspect)
