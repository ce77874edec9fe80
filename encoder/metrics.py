"""Ranking metrics for leave-one-out evaluation (one relevant item per user).

Everything is a function of the target's 0-based rank: the number of candidate items scored
strictly higher than the target (ties favour the target, which matters only for exact ties).
"""

from __future__ import annotations

import numpy as np
import torch


def target_rank(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores (B, C) with excluded candidates at -inf, targets (B,) column -> ranks (B,)."""
    t = scores.gather(1, targets[:, None])  # (B,1)
    return (scores > t).sum(dim=1)


def hits(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per user: 1.0 when the target is in the top k, else 0.0."""
    return (np.asarray(ranks) < k).astype(np.float64)


def gains(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per user NDCG@k: with one relevant item the ideal DCG is 1, so it is
    1/log2(rank + 2) inside the top k, else 0."""
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)


def hit_rate(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(hits(ranks, k)))


def ndcg(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(gains(ranks, k)))


def bootstrap_interval(
    values: np.ndarray, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-user values: users are resampled with
    replacement, so the interval says how much the mean owes to which users were evaluated
    (what matters when comparing groups of a few hundred users)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // len(x))  # bounds the (chunk, n) index matrix
    means = np.concatenate(
        [
            x[rng.integers(0, len(x), size=(min(chunk, resamples - start), len(x)))].mean(axis=1)
            for start in range(0, resamples, chunk)
        ]
    )
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return (float(low), float(high))


def average_precision(ranks: np.ndarray, k: int) -> float:
    """MAP@k; with one relevant item AP@k is 1/(rank+1) when it is in the top k, else 0."""
    r = np.asarray(ranks, dtype=np.float64)
    return float(np.mean(np.where(r < k, 1.0 / (r + 1.0), 0.0)))


def mrr(ranks: np.ndarray) -> float:
    return float(np.mean(1.0 / (np.asarray(ranks, dtype=np.float64) + 1.0)))


def coverage(top_items: np.ndarray, n_items: int) -> float:
    """Share of the catalogue (items 1..n_items) that appears in at least one top-k list."""
    if n_items <= 0:
        return 0.0
    distinct = np.unique(np.asarray(top_items).ravel())
    return float(np.sum((distinct >= 1) & (distinct <= n_items)) / n_items)


def ranking_metrics(ranks: np.ndarray, prefix: str = "") -> dict[str, float]:
    """The full-ranking set the CLI prints: ndcg/hr at 10 and 20, map@10, mrr."""
    ranks = np.asarray(ranks)
    return {
        f"{prefix}ndcg@10": ndcg(ranks, 10),
        f"{prefix}hr@10": hit_rate(ranks, 10),
        f"{prefix}ndcg@20": ndcg(ranks, 20),
        f"{prefix}hr@20": hit_rate(ranks, 20),
        f"{prefix}map@10": average_precision(ranks, 10),
        f"{prefix}mrr": mrr(ranks),
    }


def sample_negatives(
    seen: list[np.ndarray], targets: np.ndarray, n_items: int, n: int, rng: np.random.Generator
) -> np.ndarray:
    """(B, n) items drawn uniformly, without replacement, from items the user never touched
    (nor the target). Rejection sampling: fine while a user's history is small next to n_items.
    """
    out = np.zeros((len(seen), n), dtype=np.int64)
    for b, (s, t) in enumerate(zip(seen, targets, strict=True)):
        banned = set(s.tolist())
        banned.add(int(t))
        if n_items - len(banned) < n:
            raise ValueError(f"user row {b}: fewer than {n} unseen items to sample")
        picked: list[int] = []
        chosen: set[int] = set()
        while len(picked) < n:
            for c in rng.integers(1, n_items + 1, size=2 * n).tolist():
                if c not in banned and c not in chosen:
                    chosen.add(c)
                    picked.append(c)
                    if len(picked) == n:
                        break
        out[b] = picked
    return out
