"""Decayed popularity weights, their ranking and the rebase point: pure arithmetic, no Redis."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams import popularity
from streams.popularity import (
    MAX_WEIGHT_EXPONENT,
    REBASE_AFTER_HALF_LIVES,
    Decay,
    popularity_epoch,
)

HOUR = 3_600_000
NOW = 1_700_000_000_000


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The newest believable event time, fixed so the weights do not depend on the wall clock."""
    monkeypatch.setattr(popularity, "latest_event_time", lambda: NOW)


def test_the_epoch_is_the_stored_one_else_the_oldest_new_event() -> None:
    assert popularity_epoch(5, [("a", 1)]) == 5
    assert popularity_epoch(None, [("a", 30), ("b", 10), ("a", 20)]) == 10
    assert popularity_epoch(None, []) is None
    assert popularity_epoch(7, []) == 7


def test_an_event_weighs_two_to_the_half_lives_since_the_epoch() -> None:
    decay = Decay(HOUR)
    events = [("a", NOW - 2 * HOUR), ("b", NOW - 3 * HOUR), ("a", NOW)]
    weights = list(decay.weights(events, NOW - 4 * HOUR))
    assert weights == [("a", 4.0), ("b", 2.0), ("a", 16.0)]
    assert decay.increments(events, NOW - 4 * HOUR) == {"a": 20.0, "b": 2.0}


def test_event_times_past_the_clock_count_as_the_clock() -> None:
    decay = Decay(HOUR)
    assert list(decay.weights([("future", NOW + 365 * 24 * HOUR)], NOW - HOUR)) == [("future", 2.0)]


@given(st.integers(min_value=-(2**62), max_value=2**62))
def test_weights_stay_finite_wherever_the_epoch_is(epoch: int) -> None:
    ((_, weight),) = Decay(HOUR).weights([("a", NOW)], epoch)
    assert math.isfinite(weight) and weight <= 2.0**MAX_WEIGHT_EXPONENT


def test_merge_adds_unwritten_events_to_the_stored_ranking() -> None:
    decay = Decay(HOUR)
    stored = [("a", 3.0), ("b", 1.0)]
    assert decay.merge(stored, [], 0) is stored
    merged = decay.merge(stored, [("b", NOW - HOUR), ("c", NOW - HOUR)], NOW - 2 * HOUR)
    assert merged == [("a", 3.0), ("b", 3.0), ("c", 2.0)]  # ties keep the stored order
    # Without a stored epoch the first write's (the oldest event's) is used.
    assert decay.merge([], [("x", NOW - HOUR), ("y", NOW)], None) == [("y", 2.0), ("x", 1.0)]


def test_rebase_waits_until_the_weights_grow_large() -> None:
    decay = Decay(HOUR)
    at_limit = NOW - REBASE_AFTER_HALF_LIVES * HOUR
    assert decay.rebase_epoch(at_limit, [("a", NOW)]) is None
    assert decay.rebase_epoch(at_limit - HOUR, []) is None
    # An event beyond the clock counts as the clock here too.
    assert decay.rebase_epoch(at_limit, [("a", NOW + 10 * HOUR)]) is None


@given(st.floats(min_value=REBASE_AFTER_HALF_LIVES + 0.001, max_value=1e6))
def test_rebase_leaves_the_newest_event_one_to_two_half_lives_ahead(half_lives: float) -> None:
    decay = Decay(HOUR)
    epoch = int(NOW - half_lives * HOUR)
    new_epoch = decay.rebase_epoch(epoch, [("a", NOW - HOUR), ("b", NOW)])
    assert new_epoch is not None and new_epoch > epoch
    assert 1 <= (NOW - new_epoch) / HOUR < 2 + 1e-6
