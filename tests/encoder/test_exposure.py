"""Beyond-accuracy measures on lists small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from encoder.exposure import exposure_counts, exposure_metrics, gini, lorenz


def test_gini_is_zero_when_even_and_near_one_when_one_item_takes_all() -> None:
    assert gini(np.ones(10)) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 0, 4])) == pytest.approx(3 / 4)
    assert gini(np.array([1, 3])) == pytest.approx(0.25)
    assert gini(np.zeros(5)) == 0.0


def test_lorenz_runs_from_zero_to_one_under_the_diagonal() -> None:
    curve = lorenz(np.array([0, 0, 0, 4]), points=5)
    assert curve == pytest.approx([0.0, 0.0, 0.0, 0.0, 1.0])
    even = lorenz(np.ones(4), points=5)
    assert even == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_exposure_measures_of_two_users_lists() -> None:
    counts = np.array([0, 50, 30, 10, 5, 5])  # total 100; head = item 1 (ceil(0.2 * 5))
    tail = np.array([False, False, True, True, True, True])
    top = np.array([[1, 2, 0], [1, 3, 4]])  # 0 = nothing there
    m = exposure_metrics(top, counts, tail)
    slots = [1, 2, 1, 3, 4]
    assert m["average_popularity"] == pytest.approx(np.mean(counts[slots]))
    assert m["long_tail_share"] == pytest.approx(3 / 5)
    assert m["coverage"] == pytest.approx(4 / 5)
    assert m["gini"] == pytest.approx(gini(np.array([2, 1, 1, 1, 0])))
    assert m["novelty"] == pytest.approx(np.mean(-np.log2(counts[slots] / 100)))
    assert exposure_counts(top, 5).tolist() == [0, 2, 1, 1, 1, 0]


def test_nothing_recommended_is_an_error_not_a_number() -> None:
    with pytest.raises(ValueError):
        exposure_metrics(np.zeros((2, 3), np.int64), np.array([0, 1, 1]), np.ones(3, bool))
