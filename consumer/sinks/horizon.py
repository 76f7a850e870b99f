"""The event times within a horizon of a batch's: how a ledger read stays bounded by time.

The ledger is keyed meter and minute first, so a read that names the minutes near the
batch's event times (the dedup question, sinks/ledger.py; the settling of copies two
processes accepted, sinks/copies.py) prunes all others, whatever the history holds.
"""

from __future__ import annotations

from collections.abc import Sequence


def spans(times_ms: Sequence[int], horizon_ms: int, most: int = 16) -> list[tuple[int, int]]:
    """The event times within `horizon_ms` of any of `times_ms`, as at most `most` disjoint
    spans: a batch's events are usually minutes apart (one span), a late straggler adds its
    own; beyond `most`, the spans across the smallest gaps are joined (a longer read, never
    a missed copy), so the statement stays short whatever the batch holds."""
    out: list[tuple[int, int]] = []
    for t in sorted(times_ms):
        lo, hi = t - horizon_ms, t + horizon_ms
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    if len(out) > most:
        gaps = sorted(range(1, len(out)), key=lambda i: out[i][0] - out[i - 1][1])
        breaks = sorted(gaps[len(out) - most :])
        starts = [0, *breaks]
        ends = [*breaks, len(out)]
        out = [(out[a][0], out[b - 1][1]) for a, b in zip(starts, ends, strict=True)]
    return out
