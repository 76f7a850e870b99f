"""What a check finds, and the table and exit code made of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from consumer.ops.totals import format_table


class Status(IntEnum):
    """Ordered by severity; the exit code is the worst one's value."""

    OK = 0
    WARN = 1
    FAIL = 2


@dataclass(frozen=True)
class Finding:
    """One row: what was checked, how it stands, what was seen, and (when not OK) the one
    action that mends it."""

    check: str
    status: Status
    detail: str
    fix: str = ""


def ok(check: str, detail: str) -> Finding:
    return Finding(check, Status.OK, detail)


def warn(check: str, detail: str, fix: str) -> Finding:
    return Finding(check, Status.WARN, detail, fix)


def fail(check: str, detail: str, fix: str) -> Finding:
    return Finding(check, Status.FAIL, detail, fix)


def worst(findings: Sequence[Finding]) -> Status:
    return max((f.status for f in findings), default=Status.OK)


def format_report(findings: Sequence[Finding]) -> str:
    """The table, then each not-OK row's fix under its check's name, then the verdict."""
    rows = [[f.check, f.status.name, f.detail] for f in findings]
    lines = [format_table(["check", "status", "detail"], rows)]
    fixes = [f for f in findings if f.status is not Status.OK]
    if fixes:
        lines.append("")
        lines += [f"{f.status.name} {f.check}: {f.fix}" for f in fixes]
    counts = {s: sum(f.status is s for f in findings) for s in Status}
    lines.append(
        f"doctor: {worst(findings).name} "
        f"(ok={counts[Status.OK]} warn={counts[Status.WARN]} fail={counts[Status.FAIL]})"
    )
    return "\n".join(lines)


def span(seconds: float) -> str:
    """1h, 1h1m, 1m3s, 0.5s: a duration at a glance."""
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.3g}s" if seconds < 10 else f"{whole}s"
    h, rest = divmod(whole, 3600)
    m, sec = divmod(rest, 60)
    parts = [f"{h}h" if h else "", f"{m}m" if m else "", f"{sec}s" if sec and not h else ""]
    return "".join(parts)
