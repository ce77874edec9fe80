"""Offline leave-one-out evaluation: full ranking over all items with seen items excluded,
plus the 100-sampled-negatives numbers older papers report, plus catalogue coverage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from encoder import metrics
from encoder.data import (
    Interactions,
    SequenceBatch,
    eval_batch,
    load_interactions,
    memory_horizon,
    seen_items,
)
from encoder.model import EncoderConfig, InterestEncoder

N_SAMPLED_NEGATIVES = 100


@torch.no_grad()
def rank_split(
    model: InterestEncoder,
    inter: Interactions,
    batch: SequenceBatch,
    split: str,
    batch_size: int = 512,
    sampled: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics for one split of pre-built eval inputs (batch.targets is (N,))."""
    model.eval()
    rng = np.random.default_rng(seed)
    if sampled:  # tiny catalogues: as many negatives as every user has unseen items
        most_seen = max(len(s) for s in seen_items(inter, batch.users, split))
        n_neg = min(N_SAMPLED_NEGATIVES, inter.n_items - most_seen - 1)
        sampled = n_neg >= 1
    ranks, sampled_ranks, tops = [], [], []
    n_items = inter.n_items
    for start in range(0, len(batch), batch_size):
        b = batch.select(torch.arange(start, min(start + batch_size, len(batch))))
        width = max(int(b.lengths().max()), 1)
        memory0 = model.memory_from_prefix(b.prefix)
        vec = model.last_vectors(
            b.items[:, -width:], b.types[:, -width:], b.gaps[:, -width:], memory0
        )
        scores = model.item_scores(vec)  # (B, n_items+1), padding at -inf
        seen = seen_items(inter, b.users, split)
        rows = np.concatenate([np.full(len(s), r) for r, s in enumerate(seen)])
        cols = np.concatenate(seen)
        full = scores.clone()
        full[torch.from_numpy(rows), torch.from_numpy(cols)] = float("-inf")
        ranks.append(metrics.target_rank(full, b.targets).numpy())
        tops.append(full.topk(min(10, n_items), dim=1).indices.numpy())
        if sampled:
            neg = metrics.sample_negatives(seen, b.targets.numpy(), n_items, n_neg, rng)
            cand = torch.cat([b.targets[:, None], torch.from_numpy(neg)], dim=1)  # target first
            sampled_ranks.append(
                metrics.target_rank(scores.gather(1, cand), torch.zeros_like(b.targets)).numpy()
            )
    r = np.concatenate(ranks)
    out = metrics.ranking_metrics(r)
    out["coverage@10"] = metrics.coverage(np.concatenate(tops), n_items)
    if sampled:
        sr = np.concatenate(sampled_ranks)
        out["sampled_hr@10"] = metrics.hit_rate(sr, 10)
        out["sampled_ndcg@10"] = metrics.ndcg(sr, 10)
    out["users"] = float(len(r))
    return out


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


def evaluate(model_dir: Path, data: Path, split: str = "test") -> dict[str, float]:
    """Leave-one-out metrics of a trained model on a data file (its last event per user)."""
    model, item_ids = load_model(model_dir)
    cfg = model.cfg
    inter = load_interactions(Path(data), item_ids=item_ids, n_time_buckets=cfg.n_time_buckets)
    prefix = memory_horizon(cfg.memory_decay) if cfg.use_memory else 0
    batch = eval_batch(inter, split, cfg.max_len, prefix)
    return rank_split(model, inter, batch, split, sampled=True)
