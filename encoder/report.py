"""Who is served well: the numbers of `interest evaluate --report`.

For the model (at the chosen popularity penalty) and the popularity baseline side by side:
accuracy with bootstrap intervals, what they expose (encoder/exposure.py), accuracy per user
group (encoder/groups.py), and the trade-off curve of accuracy against reach over a few
penalties, so an operator can pick INTEREST_POPULARITY_PENALTY from it. The dict returned is
what encoder/report_page.py draws and writes as report.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from encoder import metrics
from encoder.evaluate import (
    TOP_K,
    Evaluation,
    Ranking,
    exclusion_rule,
    popularity_ranking,
    prepare,
    rankings,
)
from encoder.exposure import exposure_counts, exposure_metrics, lorenz
from encoder.groups import Grouping, activity_tertiles, attribute_groupings
from encoder.popularity import HEAD_SHARE, checked_penalty, long_tail, popularity_bias

PENALTIES = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
RESAMPLES = 1000
LEVEL = 0.95


def accuracy(ranks: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """NDCG@10 and HR@10 of per-user ranks, each with its bootstrap interval over users."""
    out: dict[str, Any] = {}
    for name, values in (
        ("ndcg@10", metrics.gains(ranks, TOP_K)),
        ("hr@10", metrics.hits(ranks, TOP_K)),
    ):
        out[name] = float(values.mean())
        out[f"{name}_ci"] = list(metrics.bootstrap_interval(values, RESAMPLES, LEVEL, seed))
    return out


def _system(ranking: Ranking, counts: np.ndarray, tail: np.ndarray) -> dict[str, Any]:
    return {
        "accuracy": accuracy(ranking.ranks),
        "exposure": exposure_metrics(ranking.top, counts, tail),
    }


def _groups(grouping: Grouping, model: Ranking, popular: Ranking) -> list[dict[str, Any]]:
    return [
        {
            "group": label,
            "users": len(positions),
            "model": accuracy(model.ranks[positions]),
            "popularity": accuracy(popular.ranks[positions]),
        }
        for label, positions in grouping
    ]


def _tradeoff_row(penalty: float, ranking: Ranking, ev: Evaluation, tail: np.ndarray) -> dict:
    return {
        "penalty": penalty,
        "ndcg@10": metrics.ndcg(ranking.ranks, TOP_K),
        "hr@10": metrics.hit_rate(ranking.ranks, TOP_K),
        **exposure_metrics(ranking.top, ev.counts, tail),
    }


def _history_lengths(ev: Evaluation) -> np.ndarray:
    """Events each evaluated user had before its target."""
    drop = 1 if ev.split == "test" else 2
    return np.array([len(ev.inter.sequences[u].items) - drop for u in ev.batch.users.tolist()])


def _penalties(chosen: float, curve: Sequence[float]) -> list[float]:
    return sorted({checked_penalty(p) for p in [*curve, chosen]})


def build_report(
    model_dir: Path,
    data: Path,
    popularity_penalty: float = 0.0,
    penalties: Sequence[float] = PENALTIES,
    users_file: Path | None = None,
    user_map: Path | None = None,
    exclude_seen_types: Sequence[str] | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """The report's numbers (see encoder/report_page.py for the page)."""
    try:
        curve = _penalties(popularity_penalty, penalties)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if user_map is not None and users_file is None:
        raise UserError("--user-map needs --users (the file it maps to)")
    ev = prepare(model_dir, data, split)
    user_ids = [ev.inter.user_ids[u] for u in ev.batch.users.tolist()]
    # Side files are read before the ranking, so a bad line fails fast.
    attributes = attribute_groupings(user_ids, users_file, user_map) if users_file else {}
    tail = long_tail(ev.counts, HEAD_SHARE)
    biases = [popularity_bias(ev.counts, p) if p else None for p in curve]
    rule = exclusion_rule(exclude_seen_types)
    ranked = rankings(ev.model, ev.inter, ev.batch, split, biases, exclude_types=rule)
    by_penalty = dict(zip(curve, ranked, strict=True))
    model = by_penalty[float(popularity_penalty)]
    popular = popularity_ranking(ev.inter, ev.batch, split, ev.counts, exclude_types=rule)
    groupings = {"activity": activity_tertiles(_history_lengths(ev)), **attributes}
    n_items = ev.inter.n_items
    return {
        "data": str(data),
        "model": str(model_dir),
        "split": split,
        "k": TOP_K,
        "users": len(user_ids),
        "items": n_items,
        "head_share": HEAD_SHARE,
        "popularity_penalty": float(popularity_penalty),
        "exclude_seen_types": None if exclude_seen_types is None else list(exclude_seen_types),
        "bootstrap": {"resamples": RESAMPLES, "level": LEVEL, "seed": 0},
        "systems": {
            "model": _system(model, ev.counts, tail),
            "popularity": _system(popular, ev.counts, tail),
        },
        "groups": {name: _groups(g, model, popular) for name, g in groupings.items()},
        "tradeoff": [_tradeoff_row(p, r, ev, tail) for p, r in by_penalty.items()],
        "lorenz": {
            "model": lorenz(exposure_counts(model.top, n_items)[1:]),
            "popularity": lorenz(exposure_counts(popular.top, n_items)[1:]),
            "training": lorenz(ev.counts[1:]),
        },
    }
