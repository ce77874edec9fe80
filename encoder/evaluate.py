"""Offline leave-one-out evaluation: full ranking over all items with seen items excluded,
plus the 100-sampled-negatives numbers older papers report, plus catalogue coverage.

The task is the next event of any type: the worker recommends after every event, whatever
comes next. On a typed log the same ranking is also scored on the users whose target is a
purchase (``purchase_ndcg@10``, ``purchase_hr@10``, ``purchase_users``): the next item a user
buys, the one a shop cares most about, reported beside the main numbers rather than instead
of them.

Which seen items are excluded follows the worker's rule (``INTEREST_EXCLUDE_SEEN_TYPES``):
items of an event whose type is in ``exclude_seen_types``, every type by default.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from encoder import metrics
from encoder.data import (
    Interactions,
    SequenceBatch,
    eval_batch,
    inputs_without_types,
    load_interactions,
    memory_horizon,
    seen_items,
    training_counts,
)
from encoder.features import EVENT_TYPES, excluded_type_indices, parse_event_types
from encoder.model import EncoderConfig, InterestEncoder
from encoder.popularity import checked_penalty, counts_from_vocab, popularity_bias

N_SAMPLED_NEGATIVES = 100
TOP_K = 10  # the list length the coverage and exposure measures read
PURCHASE = EVENT_TYPES.index("purchase")


@dataclass(frozen=True)
class Ranking:
    """One system's answer for every evaluated user, in the batch's user order."""

    ranks: np.ndarray  # (U,) 0-based rank of the target among the unseen items
    top: np.ndarray  # (U, 10) best unseen items, model indices


def _masked(scores: torch.Tensor, seen: list[np.ndarray]) -> torch.Tensor:
    """A copy of (B, n_items+1) scores with each user's seen items at -inf."""
    rows = np.concatenate([np.full(len(s), r) for r, s in enumerate(seen)])
    full = scores.clone()
    full[torch.from_numpy(rows), torch.from_numpy(np.concatenate(seen))] = float("-inf")
    return full


def _model_scores(model: InterestEncoder, b: SequenceBatch) -> torch.Tensor:
    """(B, n_items+1) scores at each user's last input event, padding at -inf."""
    width = max(int(b.lengths().max()), 1)
    memory0 = model.memory_from_prefix(b.prefix)
    vec = model.last_vectors(b.items[:, -width:], b.types[:, -width:], b.gaps[:, -width:], memory0)
    return model.item_scores(vec)


def _batches(batch: SequenceBatch, size: int) -> Iterator[SequenceBatch]:
    for start in range(0, len(batch), size):
        yield batch.select(torch.arange(start, min(start + size, len(batch))))


def _ranking(full: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    top = full.topk(min(TOP_K, full.shape[1] - 1), dim=1).indices.numpy()
    return metrics.target_rank(full, targets).numpy(), top


@torch.no_grad()
def rankings(
    model: InterestEncoder,
    inter: Interactions,
    batch: SequenceBatch,
    split: str,
    biases: Sequence[np.ndarray | None],
    batch_size: int = 512,
    exclude_types: frozenset[int] | None = None,
) -> list[Ranking]:
    """The model's ranking once per score bias (None: as trained; encoder/popularity.py
    ``popularity_bias`` re-ranks as the worker does), scoring each batch of users once."""
    model.eval()
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in biases]
    for b in _batches(batch, batch_size):
        scores = _model_scores(model, b)
        seen = seen_items(inter, b.users, split, exclude_types)
        for part, bias in zip(parts, biases, strict=True):
            biased = scores if bias is None else scores + torch.from_numpy(bias)
            part.append(_ranking(_masked(biased, seen), b.targets))
    return [_joined(part) for part in parts]


def popularity_ranking(
    inter: Interactions,
    batch: SequenceBatch,
    split: str,
    counts: np.ndarray,
    exclude_types: frozenset[int] | None = None,
) -> Ranking:
    """The popularity baseline: every user gets the most trained-on items they have not
    seen (ties favour the target, as for the model)."""
    scores = torch.from_numpy(np.asarray(counts, dtype=np.float32)).clone()
    scores[0] = float("-inf")
    part = []
    for b in _batches(batch, 512):
        seen = seen_items(inter, b.users, split, exclude_types)
        full = _masked(scores.expand(len(b), -1), seen)
        part.append(_ranking(full, b.targets))
    return _joined(part)


def _joined(part: list[tuple[np.ndarray, np.ndarray]]) -> Ranking:
    return Ranking(np.concatenate([r for r, _ in part]), np.concatenate([t for _, t in part]))


@torch.no_grad()
def rank_split(
    model: InterestEncoder,
    inter: Interactions,
    batch: SequenceBatch,
    split: str,
    batch_size: int = 512,
    sampled: bool = False,
    seed: int = 0,
    bias: np.ndarray | None = None,
    exclude_types: frozenset[int] | None = None,
) -> dict[str, float]:
    """Metrics for one split of pre-built eval inputs (batch.targets is (N,)); ``bias`` is
    added to every item's score (the popularity penalty); ``exclude_types``: the event types
    whose items are excluded (type indices, None: every type)."""
    model.eval()
    rng = np.random.default_rng(seed)
    if sampled:  # tiny catalogues: as many negatives as every user has unseen items
        most_seen = max(len(s) for s in seen_items(inter, batch.users, split, exclude_types))
        n_neg = min(N_SAMPLED_NEGATIVES, inter.n_items - most_seen - 1)
        sampled = n_neg >= 1
    ranks, sampled_ranks, tops = [], [], []
    n_items = inter.n_items
    for b in _batches(batch, batch_size):
        scores = _model_scores(model, b)
        if bias is not None:
            scores = scores + torch.from_numpy(bias)
        seen = seen_items(inter, b.users, split, exclude_types)
        r, top = _ranking(_masked(scores, seen), b.targets)
        ranks.append(r)
        tops.append(top)
        if sampled:
            neg = metrics.sample_negatives(seen, b.targets.numpy(), n_items, n_neg, rng)
            cand = torch.cat([b.targets[:, None], torch.from_numpy(neg)], dim=1)  # target first
            sampled_ranks.append(
                metrics.target_rank(scores.gather(1, cand), torch.zeros_like(b.targets)).numpy()
            )
    r = np.concatenate(ranks)
    out = metrics.ranking_metrics(r)
    out.update(purchase_metrics(r, batch.target_types.numpy()))
    out["coverage@10"] = metrics.coverage(np.concatenate(tops), n_items)
    if sampled:
        sr = np.concatenate(sampled_ranks)
        out["sampled_hr@10"] = metrics.hit_rate(sr, 10)
        out["sampled_ndcg@10"] = metrics.ndcg(sr, 10)
    out["users"] = float(len(r))
    return out


def purchase_metrics(ranks: np.ndarray, target_types: np.ndarray) -> dict[str, float]:
    """NDCG@10 and HR@10 over the users whose target is a purchase (none: only the count)."""
    bought = ranks[target_types == PURCHASE]
    out = {"purchase_users": float(len(bought))}
    if len(bought):
        out["purchase_ndcg@10"] = metrics.ndcg(bought, 10)
        out["purchase_hr@10"] = metrics.hit_rate(bought, 10)
    return out


def exclusion_rule(exclude_seen_types: str | Sequence[str] | None) -> frozenset[int] | None:
    """The seen-items rule from its setting's value (comma-separated names, or a list of them;
    None: every type) as type indices; a bad name is a UserError."""
    try:
        names = (
            parse_event_types(exclude_seen_types)
            if isinstance(exclude_seen_types, str)
            else exclude_seen_types
        )
        return excluded_type_indices(names)
    except ValueError as exc:
        raise UserError(f"exclude_seen_types: {exc}") from None


def load_model(model_dir: Path) -> tuple[InterestEncoder, list[str]]:
    """Model + item vocabulary from a directory written by encoder.train."""
    model_dir = Path(model_dir)
    for name in ("config.json", "model.pt", "vocab.json"):
        if not (model_dir / name).is_file():
            raise UserError(f"{model_dir} is not a trained model directory (no {name})")
    cfg = EncoderConfig.from_dict(json.loads((model_dir / "config.json").read_text()))
    model = InterestEncoder(cfg)
    model.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
    vocab = json.loads((model_dir / "vocab.json").read_text())
    return model.eval(), list(vocab["items"])


def model_counts(model_dir: Path, inter: Interactions) -> np.ndarray:
    """The training counts the model was exported with (vocab.json), else, for a model
    directory that has none, the same counts taken from the evaluated log."""
    vocab = json.loads((Path(model_dir) / "vocab.json").read_text())
    try:
        counts = counts_from_vocab(vocab, inter.n_items)
    except ValueError as exc:
        raise UserError(f"{model_dir}/vocab.json: {exc}") from None
    return counts if counts is not None else training_counts(inter)


@dataclass(frozen=True)
class Evaluation:
    """A trained model and a log made ready for leave-one-out ranking."""

    model: InterestEncoder
    inter: Interactions
    batch: SequenceBatch
    split: str
    counts: np.ndarray  # (n_items + 1,) training events per item


def prepare(model_dir: Path, data: Path, split: str = "test") -> Evaluation:
    model, item_ids = load_model(model_dir)
    cfg = model.cfg
    inter = load_interactions(Path(data), item_ids=item_ids, n_time_buckets=cfg.n_time_buckets)
    prefix = memory_horizon(cfg.memory_decay) if cfg.use_memory else 0
    batch = eval_batch(inter, split, cfg.max_len, prefix)
    if not cfg.uses_event_types:  # fed as the worker feeds it: every event the default type
        batch = inputs_without_types(batch)
    return Evaluation(model, inter, batch, split, model_counts(model_dir, inter))


def evaluate(
    model_dir: Path,
    data: Path,
    split: str = "test",
    popularity_penalty: float = 0.0,
    exclude_seen_types: str | Sequence[str] | None = None,
) -> dict[str, float]:
    """Leave-one-out metrics of a trained model on a data file (its last event per user),
    its scores re-ranked by the popularity penalty and its seen items excluded by
    ``exclude_seen_types`` (INTEREST_EXCLUDE_SEEN_TYPES' value) as the worker would."""
    try:
        penalty = checked_penalty(popularity_penalty)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    rule = exclusion_rule(exclude_seen_types)
    ev = prepare(model_dir, data, split)
    bias = popularity_bias(ev.counts, penalty) if penalty else None
    return rank_split(
        ev.model, ev.inter, ev.batch, split, sampled=True, bias=bias, exclude_types=rule
    )
