"""The C side of consumer.avrofast (private: use that module)."""

from collections.abc import Mapping, Sequence

class Buffer:
    """Memory owned by one output column; exported as a writable buffer."""

    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __len__(self) -> int: ...

def decode(
    values: Sequence[bytes | None], programs: Mapping[int, bytes], /
) -> tuple[
    int,
    Buffer,  # slow: uint8 0/1 a row
    Buffer,  # schema_id: uint32 a row
    Buffer,  # event_id: int32 offsets (n + 1)
    Buffer,  # event_id: UTF-8 data
    Buffer,  # event_name offsets
    Buffer,  # event_name data
    Buffer,  # customer_id offsets
    Buffer,  # customer_id data
    Buffer,  # cancels offsets
    Buffer,  # cancels data
    Buffer,  # value: 16-byte little-endian two's complement a row
    Buffer,  # timestamp: int64 a row
    Buffer,  # properties: int32 entry offsets (n + 1)
    Buffer,  # keys: int32 offsets (entries + 1)
    Buffer,  # keys: UTF-8 data
    Buffer,  # items: int32 offsets (entries + 1)
    Buffer,  # items: UTF-8 data
    Buffer,  # id_hash: uint64 a row
]: ...
def hash_strings(values: Sequence[str], /) -> Buffer: ...
def schema_ids(values: Sequence[bytes | None], /) -> list[int]: ...
