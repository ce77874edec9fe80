"""The top-k graph against its plain reference: same items, same scores, same exclusions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from export.scoring import TopKScorer, exclusion_matrix, top_k_reference

N_ITEMS, D = 30, 8
RNG = np.random.default_rng(0)
ITEMS = RNG.normal(size=(N_ITEMS + 1, D)).astype(np.float32)
ITEMS[0] = 0.0  # padding row, as exported
SCORER = TopKScorer(ITEMS)


def _check(vectors: np.ndarray, k: int, exclude: list[list[int]]) -> None:
    got_i, got_s = SCORER.top_k(vectors, k, exclude)
    ref_i, ref_s = top_k_reference(vectors @ ITEMS.T, min(k, N_ITEMS + 1), exclude)
    np.testing.assert_array_equal(got_i, ref_i)
    np.testing.assert_allclose(got_s, ref_s, rtol=1e-5, atol=1e-5)
    # The same lists as one matrix padded with 0 (what the worker passes): same answer.
    matrix = np.zeros((len(exclude), max([len(row) for row in exclude] + [1])), np.int64)
    for b, row in enumerate(exclude):
        matrix[b, : len(row)] = row
    got_i, got_s = SCORER.top_k(vectors, k, matrix)
    np.testing.assert_array_equal(got_i, ref_i)
    np.testing.assert_allclose(got_s, ref_s, rtol=1e-5, atol=1e-5)


def test_matches_reference_on_edge_cases() -> None:
    vectors = RNG.normal(size=(5, D)).astype(np.float32)
    exclude = [[1, 2, 3], [], list(range(1, 28)), [29, 0, -1, 99], list(range(31))]
    for k in (1, 5, 40):
        _check(vectors, k, exclude)
    idx, scores = SCORER.top_k(vectors, 5, exclude)
    assert 0 not in idx[1] and not set(idx[0].tolist()) & {1, 2, 3}
    assert sorted(idx[2].tolist()) == [0, 0, 28, 29, 30]  # fewer than k left: 0 / -inf tail
    assert (idx[4] == 0).all() and np.isneginf(scores[4]).all()  # everything seen


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 6),
    k=st.integers(1, 35),
    seed=st.integers(0, 2**16),
    seen=st.lists(st.lists(st.integers(-2, N_ITEMS + 3), max_size=40), min_size=6, max_size=6),
)
def test_matches_reference(batch: int, k: int, seed: int, seen: list[list[int]]) -> None:
    vectors = np.random.default_rng(seed).normal(size=(batch, D)).astype(np.float32)
    _check(vectors, k, seen[:batch])


def test_empty_batch_and_bad_exclude() -> None:
    idx, scores = SCORER.top_k(np.zeros((0, D), np.float32), 5, [])
    assert idx.shape == scores.shape == (0, 5)
    with pytest.raises(ValueError):
        SCORER.top_k(np.zeros((2, D), np.float32), 5, [[1]])


def test_exclusion_matrix_pads_and_drops_out_of_range() -> None:
    m = exclusion_matrix([[3, -1], [], [40, 2, 2]], 3, n=31)
    assert m.tolist() == [[0, 3, 0, 0], [0, 0, 0, 0], [0, 0, 2, 2]]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), penalty=st.floats(0.01, 5.0), k=st.integers(1, 35))
def test_a_popularity_bias_is_added_before_the_exclusions(
    seed: int, penalty: float, k: int
) -> None:
    from encoder.popularity import popularity_bias

    rng = np.random.default_rng(seed)
    bias = popularity_bias(rng.integers(0, 1000, N_ITEMS + 1), penalty)
    scorer = TopKScorer(ITEMS, bias=bias)
    vectors = rng.normal(size=(4, D)).astype(np.float32)
    exclude = [rng.integers(1, N_ITEMS + 1, size=5).tolist() for _ in range(4)]
    got_i, got_s = scorer.top_k(vectors, k, exclude)
    ref_i, ref_s = top_k_reference(vectors @ ITEMS.T + bias, min(k, N_ITEMS + 1), exclude)
    np.testing.assert_array_equal(got_i, ref_i)
    np.testing.assert_allclose(got_s, ref_s, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bias"):
        TopKScorer(ITEMS, bias=bias[:-1])
