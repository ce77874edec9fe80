"""The worker's exposure window against a plain reference: a deque of the last slots."""

from __future__ import annotations

from collections import Counter, deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.exposure import OUTSIDE, Catalogue, ExposureWindow

N_ITEMS = 12
TAIL = np.array([False] + [i >= 3 for i in range(N_ITEMS)])  # head: items 1-3
CATALOGUE = Catalogue("v1", TAIL)


def _reference(batches: list[list[int]], size: int) -> tuple[float, float, list[tuple[int, int]]]:
    window: deque[int] = deque(maxlen=size)
    added = []
    for batch in batches:
        slots = [s for s in batch if s != 0]
        slots = [s if 1 <= s <= N_ITEMS else OUTSIDE for s in slots][-size:]
        tail = sum(1 for s in slots if s == OUTSIDE or TAIL[s])
        added.append((len(slots) - tail, tail))
        window.extend(slots)
    shown = Counter(s for s in window if s != OUTSIDE)
    tail_share = sum(1 for s in window if s == OUTSIDE or TAIL[s]) / len(window) if window else 0
    return len(shown) / N_ITEMS, tail_share, added


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(1, 30),
    batches=st.lists(st.lists(st.integers(-1, N_ITEMS + 2), max_size=40), max_size=8),
)
def test_matches_the_reference(size: int, batches: list[list[int]]) -> None:
    window = ExposureWindow(CATALOGUE, size)
    added = [window.add(np.array(b, np.int64)) for b in batches]
    coverage, tail_share, expected_added = _reference(batches, size)
    assert added == expected_added
    assert window.coverage() == pytest.approx(coverage)
    assert window.long_tail_share() == pytest.approx(tail_share)


def test_an_empty_window_reads_zero_and_size_must_be_positive() -> None:
    window = ExposureWindow(CATALOGUE, 5)
    assert (window.coverage(), window.long_tail_share(), window.slots) == (0.0, 0.0, 0)
    with pytest.raises(ValueError):
        ExposureWindow(CATALOGUE, 0)
