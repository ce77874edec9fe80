"""Cost of the training loss variants on real batches, side by side in one run.

    python bench/softmax.py --data ml-1m     # sampled (auto k) vs fused full vs autograd full
    python bench/softmax.py --data beauty

One training step (forward + backward of `next_item_loss`) on the same real batches, the
variants interleaved batch by batch so machine noise lands on all of them; prints seconds per
step and the ratios.

Why: training switches to a sampled softmax when the full one would cost too much per epoch
(encoder.train's auto_negatives); this shows what that choice saves on a given catalogue, and
is the check to rerun when the model or the loss changes.

Data: ../shared/data/ml-1m.txt or beauty.txt (never committed); where it is missing the bench
prints "skipped: ..." and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encoder.data import load_interactions, memory_horizon, train_batch  # noqa: E402
from encoder.model import EncoderConfig, InterestEncoder  # noqa: E402
from encoder.train import (  # noqa: E402
    TrainConfig,
    _length_bucketed_batches,
    auto_dropout,
    auto_negatives,
    next_item_loss,
    popularity_proposal,
    vectors_at_targets,
)

DATA_DIR = ROOT.parent / "shared" / "data"
DATA_SETS = {"ml-1m": "ml-1m.txt", "beauty": "beauty.txt"}


def autograd_full_loss(model: InterestEncoder, b) -> torch.Tensor:
    """The plain reference: logits for every item, then autograd's cross-entropy."""
    h, targets = vectors_at_targets(model, b)
    return F.cross_entropy(model.item_scores(h), targets)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="ml-1m", choices=list(DATA_SETS))
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    args = ap.parse_args()
    path = DATA_DIR / DATA_SETS[args.data]
    if not path.is_file():
        print(f"skipped: {path} not found (the data sets are not committed)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tc = TrainConfig()
    inter = load_interactions(path)
    cfg = EncoderConfig(n_items=inter.n_items, dropout=auto_dropout(inter))
    data = train_batch(inter, cfg.max_len, memory_horizon(cfg.memory_decay), every_window=True)
    k = auto_negatives(int((data.targets != 0).sum()), cfg.n_items, tc.logits_per_epoch) or 512
    proposal = popularity_proposal(data.targets, cfg.n_items)
    model = InterestEncoder(cfg)
    gen = torch.Generator().manual_seed(0)
    batches = _length_bucketed_batches(data.lengths(), tc.batch_size, gen)[: args.batches]
    variants = {
        f"sampled softmax, {k} negatives": lambda b: next_item_loss(model, b, k, proposal),
        "full softmax, fused": lambda b: next_item_loss(model, b, 0),
        "full softmax, autograd": lambda b: autograd_full_loss(model, b),
    }
    seconds = dict.fromkeys(variants, 0.0)
    for i, idx in enumerate(batches):
        b = data.select(idx)
        for name, loss_of in variants.items():
            t0 = time.perf_counter()
            loss_of(b).backward()
            if i > 0:  # the first batch warms up allocators and kernels
                seconds[name] += time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
    steps = max(len(batches) - 1, 1)
    base = seconds[next(iter(variants))]
    print(
        f"{args.data}: {cfg.n_items} items, batch {tc.batch_size}, threads "
        f"{torch.get_num_threads()}, {steps} timed steps"
    )
    for name, s in seconds.items():
        print(f"{name:32s} {s / steps:7.3f} s/step  {s / base:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
