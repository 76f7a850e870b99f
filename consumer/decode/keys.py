"""The dedup key of (meter, event id): 64 bits computed for a whole range at once.

The decoder hashes every event id in C; each meter adds its salt. The ledger's `id_key`
(sipHash64 in ClickHouse) is a different hash and decides; this key serves the in-memory
filter, which is rebuilt from the ledger in each process, so it need not be stable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from consumer.decode import fast

Keys = npt.NDArray[np.int64]
_U64 = 2**64 - 1


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finalizer: spreads (event id hash ^ meter salt) over all 64 bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def meter_salt(meter: str) -> int:
    return fast.id_hash_bytes(meter.encode())


def keys_of(id_hashes: npt.NDArray[np.uint64], salts: npt.NDArray[np.uint64]) -> Keys:
    """The filter key of (meter, event id) for many rows: the event ids' hashes (computed by
    the decoder) mixed with their meters' salts. Fixed across processes and versions only
    by accident: the filter is rebuilt from the ledger in each process."""
    with np.errstate(over="ignore"):
        return _mix(id_hashes ^ salts).view(np.int64)


def key_of(salt: int, event_id: str) -> int:
    h = np.array([fast.id_hash_bytes(event_id.encode())], np.uint64)
    return int(keys_of(h, np.array([salt], np.uint64))[0])


def id_hash(meter: str, event_id: str) -> int:
    """The filter key of one (meter, event id), as `keys_of` computes it for many."""
    return key_of(meter_salt(meter), event_id)


def ids_keys(meters: Sequence[str], event_ids: Sequence[str]) -> Keys:
    """Keys of ledger rows (filter rebuilds): the C hash of every id, one salt a meter."""
    salts = {m: meter_salt(m) for m in set(meters)}
    return keys_of(fast.hash_strings(event_ids), np.fromiter((salts[m] for m in meters), np.uint64))
