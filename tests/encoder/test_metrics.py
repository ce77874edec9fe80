"""Metrics on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from encoder import metrics


def test_target_rank_counts_strictly_higher_scores() -> None:
    scores = torch.tensor([[float("-inf"), 0.9, 0.1, 0.5], [float("-inf"), 0.2, 0.3, 0.1]])
    assert metrics.target_rank(scores, torch.tensor([3, 2])).tolist() == [1, 0]


def test_rank_based_metrics_by_hand() -> None:
    ranks = np.array([0, 1, 9, 10, 25])
    assert metrics.hit_rate(ranks, 10) == pytest.approx(3 / 5)
    assert metrics.hit_rate(ranks, 20) == pytest.approx(4 / 5)
    expected_ndcg10 = (1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5
    assert metrics.ndcg(ranks, 10) == pytest.approx(expected_ndcg10)
    expected_ndcg20 = expected_ndcg10 + (1 / math.log2(12)) / 5
    assert metrics.ndcg(ranks, 20) == pytest.approx(expected_ndcg20)
    assert metrics.average_precision(ranks, 10) == pytest.approx((1 + 1 / 2 + 1 / 10) / 5)
    assert metrics.mrr(ranks) == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 26) / 5)


def test_ranking_metrics_keys_are_lower_case() -> None:
    out = metrics.ranking_metrics(np.array([0, 3]))
    assert set(out) == {"ndcg@10", "hr@10", "ndcg@20", "hr@20", "map@10", "mrr"}
    assert out["hr@10"] == 1.0


def test_coverage_counts_distinct_real_items() -> None:
    tops = np.array([[1, 2], [2, 3], [0, 3]])  # 0 is padding, not an item
    assert metrics.coverage(tops, 6) == pytest.approx(3 / 6)


def test_sampled_negatives_avoid_seen_items_and_target() -> None:
    rng = np.random.default_rng(0)
    seen = [np.array([1, 2, 3]), np.array([5])]
    neg = metrics.sample_negatives(seen, np.array([4, 6]), n_items=120, n=100, rng=rng)
    assert neg.shape == (2, 100)
    for row, s, t in zip(neg, seen, [4, 6], strict=True):
        assert len(set(row.tolist())) == 100
        assert not set(row.tolist()) & (set(s.tolist()) | {t})
        assert row.min() >= 1 and row.max() <= 120


def test_sampled_negatives_refuse_too_small_catalogue() -> None:
    with pytest.raises(ValueError):
        metrics.sample_negatives([np.array([1])], np.array([2]), 50, 100, np.random.default_rng(0))
