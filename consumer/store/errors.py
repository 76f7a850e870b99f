"""Which ClickHouse failures a retry can fix, by ClickHouse's exception code.

Both backends turn every failure into one of two StoreErrors (backend.py):
`StoreUnavailable` (the store is unreachable, overloaded or between replicas: pause and
retry, as for an outage) or `StoreBug` (the statement or the schema is wrong: a retry
repeats it forever, so the process stops, loudly, with the code and the statement).

A code in neither list stops the process too. The transient codes are a short, settled
family (network, time, capacity, Keeper and replicas); the codes of a wrong statement are
hundreds and grow with each ClickHouse release. Stopping on an unknown code costs a
restart, and a restart retries the work anyway (nothing past a durable effect is ever
committed); retrying an unknown bug forever costs a silent stall behind a failing
/readyz. So what is not known to heal is seen.

The names and codes below are ClickHouse's (src/Common/ErrorCodes.cpp); a test checks each
against the engine's own `system.errors`.
"""

from __future__ import annotations

import re

from consumer.store.backend import StoreBug, StoreError, StoreUnavailable

# A retry heals these: the store is unreachable, slow, full for now, or a replica or Keeper
# is away. Each is one the store's own operator fixes, never this process's statement.
TRANSIENT: dict[int, str] = {
    # the network and the connection
    95: "CANNOT_READ_FROM_SOCKET",
    96: "CANNOT_WRITE_TO_SOCKET",
    198: "DNS_ERROR",
    209: "SOCKET_TIMEOUT",
    210: "NETWORK_ERROR",
    279: "ALL_CONNECTION_TRIES_FAILED",
    519: "NO_REMOTE_SHARD_AVAILABLE",
    762: "HTTP_CONNECTION_LIMIT_REACHED",
    1000: "POCO_EXCEPTION",
    # time
    159: "TIMEOUT_EXCEEDED",
    160: "TOO_SLOW",
    # capacity: load, memory, parts, quotas, disk
    173: "CANNOT_ALLOCATE_MEMORY",
    201: "QUOTA_EXCEEDED",
    202: "TOO_MANY_SIMULTANEOUS_QUERIES",
    241: "MEMORY_LIMIT_EXCEEDED",
    243: "NOT_ENOUGH_SPACE",
    252: "TOO_MANY_PARTS",
    439: "CANNOT_SCHEDULE_TASK",
    574: "DISTRIBUTED_TOO_MANY_PENDING_BYTES",
    745: "SERVER_OVERLOADED",
    # Keeper, replicas and the distributed DDL queue
    225: "NO_ZOOKEEPER",
    236: "ABORTED",
    242: "TABLE_IS_READ_ONLY",
    285: "TOO_FEW_LIVE_REPLICAS",
    286: "UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE",
    289: "REPLICA_IS_NOT_IN_QUORUM",
    319: "UNKNOWN_STATUS_OF_INSERT",
    341: "UNFINISHED",
    369: "ALL_REPLICAS_ARE_STALE",
    394: "QUERY_WAS_CANCELLED",
    415: "ALL_REPLICAS_LOST",
    416: "REPLICA_STATUS_CHANGED",
    473: "DEADLOCK_AVOIDED",
    529: "NOT_A_LEADER",
    733: "TABLE_IS_BEING_RESTARTED",
    999: "KEEPER_EXCEPTION",
}

# A retry repeats these: the statement, the schema or the access is wrong. Listed for the
# message and the docs; any code not in TRANSIENT is handled the same way.
BUG: dict[int, str] = {
    6: "CANNOT_PARSE_TEXT",
    8: "THERE_IS_NO_COLUMN",
    10: "NOT_FOUND_COLUMN_IN_BLOCK",
    16: "NO_SUCH_COLUMN_IN_TABLE",
    36: "BAD_ARGUMENTS",
    42: "NUMBER_OF_ARGUMENTS_DOESNT_MATCH",
    43: "ILLEGAL_TYPE_OF_ARGUMENT",
    44: "ILLEGAL_COLUMN",
    46: "UNKNOWN_FUNCTION",
    47: "UNKNOWN_IDENTIFIER",
    49: "LOGICAL_ERROR",
    53: "TYPE_MISMATCH",
    60: "UNKNOWN_TABLE",
    62: "SYNTAX_ERROR",
    69: "ARGUMENT_OUT_OF_BOUND",
    70: "CANNOT_CONVERT_TYPE",
    80: "INCORRECT_QUERY",
    81: "UNKNOWN_DATABASE",
    115: "UNKNOWN_SETTING",
    164: "READONLY",
    407: "DECIMAL_OVERFLOW",
    456: "UNKNOWN_QUERY_PARAMETER",
    457: "BAD_QUERY_PARAMETER",
    497: "ACCESS_DENIED",
    516: "AUTHENTICATION_FAILED",
}

UNKNOWN_TABLE = 60
_CODE = re.compile(r"\bCode:\s*(\d+)")
_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)")
_STATEMENT_CHARS = 160
_MESSAGE_CHARS = 400


def code_in(message: str) -> int | None:
    """The code of ClickHouse's `Code: NN. DB::Exception: ...` text, if it holds one."""
    m = _CODE.search(message)
    return int(m.group(1)) if m else None


def first_line(sql: str) -> str:
    """A statement's first non-blank line, cut short: enough to find it in the code."""
    line = next((s.strip() for s in sql.splitlines() if s.strip()), "")
    return line if len(line) <= _STATEMENT_CHARS else line[: _STATEMENT_CHARS - 3] + "..."


def classified(message: str, code: int | None, sql: str, reachable: bool = True) -> StoreError:
    """The StoreError for a failure of `sql`: `code` is ClickHouse's (None when the answer
    held none); `reachable` is False when no answer came at all (no connection, a dropped
    one, a proxy's 5xx), which is always worth a retry."""
    if not reachable or code in TRANSIENT:
        return StoreUnavailable(message, code)
    name = BUG.get(code) if code is not None else None
    if name is None and code is not None:
        found = _NAME.findall(message)
        name = found[-1] if found else None
    said = message.strip().splitlines()[0][:_MESSAGE_CHARS] if message.strip() else "no message"
    kind = f"code {code} {name or ''}".strip() if code is not None else "no ClickHouse code"
    return StoreBug(f"{first_line(sql)!r} failed ({kind}), which a retry cannot fix: {said}", code)
