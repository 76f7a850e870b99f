"""Reconcile's pieces: every timestamp of the span falls in exactly the piece that holds it,
found by binary search."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.ops.reconcile import MINUTE, SPAN, piece_at, pieces


@given(
    st.integers(0, 10**5),
    st.integers(1, 10**4),
    st.sampled_from(sorted(SPAN)),
    st.lists(st.integers(0, 10**9), min_size=1, max_size=50),
)
def test_each_timestamp_lands_in_the_piece_that_holds_it(
    start_minute: int, minutes: int, window: str, offsets: list[int]
) -> None:
    start, length = start_minute * MINUTE, minutes * MINUTE
    cuts = pieces(start, start + length, window)
    starts = [p.start for p in cuts]
    for off in offsets:
        ts = start + off % length
        found = piece_at(cuts, starts, ts)
        assert found.start <= ts < found.end
        assert found == max((p for p in cuts if p.start <= ts), key=lambda p: p.start)


def test_a_timestamp_before_the_first_piece_is_an_error_not_the_first_piece() -> None:
    cuts = pieces(10 * MINUTE, 200 * MINUTE, "hour")
    starts = [p.start for p in cuts]
    with pytest.raises(ValueError, match="before the first piece"):
        piece_at(cuts, starts, 10 * MINUTE - 1)
