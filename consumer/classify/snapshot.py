"""A range's snapshot: everything its classification depends on besides the records, frozen
at range start and recorded with its intent, so a re-form classifies every event the same
way (P1)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Snapshot:
    """Everything classification depends on besides the records, frozen at range start.

    `schema_ids` records which writer schemas the range's messages name, for audits: only in
    the done row, as the headers are parsed after the intent (P7); `suspect` is the span a
    poison search is narrowing (P7, consumer/intent/poison.py). `incarnated`: the range's
    ledger rows carry its topic's incarnation (migration 25); False only for an intent an
    earlier version wrote, whose crashed attempt may have left rows that carry none."""

    watermarks: dict[str, int]
    config_hash: str
    stamp_ms: int
    schema_ids: list[int] = field(default_factory=list)
    suspect: tuple[int, int] | None = None
    incarnated: bool = True

    def to_json(self) -> str:
        body: dict[str, object] = {
            "watermarks": self.watermarks,
            "config_hash": self.config_hash,
            "stamp_ms": self.stamp_ms,
            "schema_ids": self.schema_ids,
        }
        if self.suspect is not None:
            body["suspect"] = list(self.suspect)
        if self.incarnated:
            body["incarnated"] = True
        return json.dumps(body, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        d = json.loads(text)
        suspect = d.get("suspect")
        return cls(
            {k: int(v) for k, v in d["watermarks"].items()},
            d["config_hash"],
            int(d["stamp_ms"]),
            [int(i) for i in d.get("schema_ids", [])],
            (int(suspect[0]), int(suspect[1])) if suspect else None,
            bool(d.get("incarnated", False)),
        )
