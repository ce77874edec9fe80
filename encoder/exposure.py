"""Who gets shown: beyond-accuracy measures of a set of top-k lists.

Accuracy says whether each user's next item was found; these say what the recommender shows
overall, where popularity bias lives: how popular the recommended items are, how unevenly
exposure spreads over the catalogue, how much of the long tail and of the catalogue is ever
shown, and how unexpected the items are. Every measure reads the training counts
(encoder/data.py ``training_counts``), so a model and the popularity baseline are measured on
the same footing.

Numpy only.
"""

from __future__ import annotations

import numpy as np


def exposure_counts(top: np.ndarray, n_items: int) -> np.ndarray:
    """(n_items + 1,) how often each item appears in the (U, k) top lists; padding (0) and
    anything outside 1..n_items are not counted."""
    flat = np.asarray(top, dtype=np.int64).ravel()
    flat = flat[(flat >= 1) & (flat <= n_items)]
    return np.bincount(flat, minlength=n_items + 1)


def gini(values: np.ndarray) -> float:
    """Gini index of non-negative values: 0 when all are equal, (n-1)/n when one holds all."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float(np.sum((2 * ranks - n - 1) * x) / (n * total))


def lorenz(values: np.ndarray, points: int = 101) -> list[float]:
    """The Lorenz curve at ``points`` evenly spaced shares of the values (smallest first): the
    share of the total held by the smallest x share of them."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    total = x.sum()
    if len(x) == 0 or total == 0:
        return np.linspace(0, 1, points).tolist()
    cumulative = np.concatenate([[0.0], np.cumsum(x) / total])
    at = np.linspace(0, len(x), points)
    return np.interp(at, np.arange(len(x) + 1), cumulative).tolist()


def exposure_metrics(top: np.ndarray, counts: np.ndarray, tail: np.ndarray) -> dict[str, float]:
    """Measures of (U, k) top lists of model item indices (0 = no item), given the (n_items+1,)
    training counts and long-tail mask (encoder/popularity.py ``long_tail``):

    average_popularity  mean training count of the recommended items
    gini                Gini index of the exposure of every catalogue item
    long_tail_share     share of the recommended slots that hold a long-tail item
    coverage            share of the catalogue recommended at least once
    novelty             mean self-information -log2(p) of the recommended items, p = the
                        item's share of training events (an unseen item counts as one event)
    """
    counts = np.asarray(counts, dtype=np.int64)
    n_items = len(counts) - 1
    flat = np.asarray(top, dtype=np.int64).ravel()
    flat = flat[(flat >= 1) & (flat <= n_items)]
    if len(flat) == 0:
        raise ValueError("no recommended items to measure")
    shown = exposure_counts(flat, n_items)[1:]
    share = np.maximum(counts[flat], 1) / max(int(counts.sum()), 1)
    return {
        "average_popularity": float(counts[flat].mean()),
        "gini": gini(shown),
        "long_tail_share": float(np.asarray(tail)[flat].mean()),
        "coverage": float(np.count_nonzero(shown) / n_items),
        "novelty": float(np.mean(-np.log2(share))),
    }
