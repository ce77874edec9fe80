"""Train the interest encoder: next-item cross-entropy at every position.

Why cross-entropy over the catalogue: published SASRec results gain most of their accuracy
from it over the original sampled BCE (bench/quality.py compares with them). The full softmax
is used while an epoch's logits stay small; past that, a sampled softmax with popularity-drawn,
logQ-corrected negatives estimates it at a fraction of the cost (on a CPU the output layer
otherwise dominates an epoch). Batches are
bucketed by length and trimmed to their longest user, so short-history data sets (Beauty) do
not pay for 200 padded positions."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.errors import UserError
from encoder.data import (
    Interactions,
    SequenceBatch,
    eval_batch,
    inputs_without_types,
    load_interactions,
    memory_horizon,
    train_batch,
    training_counts,
)
from encoder.evaluate import exclusion_rule, rank_split
from encoder.features import DEFAULT_EVENT_TYPE, EVENT_TYPES, event_type_index
from encoder.model import EncoderConfig, InterestEncoder
from encoder.popularity import VOCAB_COUNTS_KEY

SCHEDULES = ("constant", "cosine", "wsd")
DENSE_EVENTS_PER_USER = 20  # ml-1m has 165 events per user, Amazon Beauty 9


@dataclass
class TrainConfig:
    lr: float = 4e-3
    weight_decay: float | None = None  # None = by the data's density (auto_weight_decay)
    batch_size: int = 64  # more updates per (expensive) epoch than SASRec's 128
    max_epochs: int = 300
    max_minutes: float = 30.0  # wall-clock budget for the training loop (incl. validation)
    # epochs without a better validation NDCG@10 before "constant" stops and "wsd" starts its
    # decay early (then stops once the rate reaches 0); "cosine" runs to its end
    patience: int = 5
    # softmax size: 0 = full softmax over all items, k > 0 = target + k uniform negatives,
    # -1 = auto: full softmax while (train positions x items) fits logits_per_epoch, else the k
    # that fits it (see auto_negatives)
    n_negatives: int = -1
    # where sampled negatives come from: "popularity" (popularity_proposal, logQ-corrected) or
    # "uniform"
    negative_sampling: str = "popularity"
    logits_per_epoch: float = 5e8
    # Linear warm-up over warmup_steps, then "constant"; "cosine": decay to 0 over the run;
    # "wsd" (warmup-stable-decay, see LearningRate): constant, then linear decay to 0 over the
    # last decay_fraction of the run. "The run" ends at max_epochs or max_minutes, whichever
    # comes first, so a time-boxed run still ends at a low rate.
    lr_schedule: str = "wsd"
    warmup_steps: int = 100
    decay_fraction: float = 0.5
    # validate on a fixed random subset of users per epoch (0 = all): large enough that the
    # epoch-to-epoch noise of a small sample does not pick the checkpoint
    val_users: int = 10_000
    # train on every max_len window of long histories, not only the last one (data.train_batch)
    every_window: bool = True
    # also train on the validation event of the users outside the validation sample: only the
    # sample needs it held out, and a user's newest events are the most like the test targets
    # (it measured clearly better on Beauty). Never on any test event. False = every user's
    # validation event held out, as the published SASRec numbers were trained (bench/quality.py)
    train_on_validation: bool = True
    # The seen-items rule validation ranks under (event type names, None: every type), as
    # `interest evaluate` and the worker will: on logs where users come back to items (shops),
    # excluding them makes most validation targets unrankable and the checkpoint a guess.
    exclude_seen_types: tuple[str, ...] | None = None
    # Loss weight of a target by its event type ({"purchase": 2.0}); types not named weigh 1.
    # Empty, every target alike, by default: weighting purchases up ranked neither the next
    # item nor the next purchase better on the Taobao slice (bench/behaviour.py).
    type_weights: dict[str, float] = field(default_factory=dict)
    # Add each item's category to its embedding (model.ItemEmbedding) when the log gives
    # categories (UserBehavior, a CSV category column). Off by default: on the Taobao slice it
    # helped the next item only where every seen item is excluded, and not the next purchase
    # (bench/behaviour.py).
    item_categories: bool = False
    seed: int = 0
    threads: int = 0  # 0 = all cores available to this process


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _length_bucketed_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator):
    """Shuffle, sort by length inside chunks of 32 batches, shuffle the batches."""
    perm = torch.randperm(len(lengths), generator=gen)
    chunk = batch_size * 32
    batches = []
    for s in range(0, len(perm), chunk):
        part = perm[s : s + chunk]
        part = part[torch.argsort(lengths[part], stable=True)]
        batches.extend(part.split(batch_size))
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


class LearningRate:
    """The learning rate at each step: linear warm-up, then the configured schedule.

    Why wsd is the default: on ml-1m at a constant rate validation plateaus early, and the
    final linear decay gains more than the epochs after the plateau did (bench/quality.py).
    Its decay normally takes the last ``decay_fraction`` of the run; when validation stops
    improving first, ``start_decay`` begins it at once, lasting the same share of the run so
    far, and the run ends when it reaches 0: early stopping that still gets the decay's gain.
    Progress through the run is the larger of the time budget and the epoch budget used.
    """

    def __init__(self, tc: TrainConfig, total_steps: int, budget_s: float, t_start: float) -> None:
        self.tc = tc
        self.total_steps = max(total_steps, 1)
        self.budget_s = budget_s
        self.t_start = t_start  # time.monotonic() when the budget began
        self.decay_from = 1.0 - tc.decay_fraction  # progress where wsd's decay starts ...
        self.decay_to = 1.0  # ... and where it reaches 0
        self.decay_started_early = False

    def progress(self, step: int) -> float:
        elapsed = (time.monotonic() - self.t_start) / self.budget_s
        return min(1.0, max(elapsed, step / self.total_steps))

    def __call__(self, step: int) -> float:
        tc = self.tc
        rate = tc.lr * min(1.0, (step + 1) / max(tc.warmup_steps, 1))
        if tc.lr_schedule == "constant":
            return rate
        done = self.progress(step)
        if tc.lr_schedule == "cosine":
            return rate * 0.5 * (1.0 + math.cos(math.pi * done))
        if done <= self.decay_from:
            return rate
        return rate * max(0.0, (self.decay_to - done) / (self.decay_to - self.decay_from))

    def start_decay(self, step: int) -> None:
        """Validation has plateaued: begin wsd's decay now (no-op once it has begun)."""
        done = self.progress(step)
        if self.tc.lr_schedule != "wsd" or done >= self.decay_from:
            return
        share = self.tc.decay_fraction / max(1.0 - self.tc.decay_fraction, 1e-9)
        self.decay_from, self.decay_to = done, min(1.0, done * (1.0 + share))
        self.decay_started_early = True

    def decayed(self, step: int) -> bool:
        """The early decay has reached 0: nothing more to learn."""
        return self.decay_started_early and self.progress(step) >= self.decay_to


def vectors_at_targets(model: InterestEncoder, b: SequenceBatch) -> tuple[torch.Tensor, ...]:
    """The interest vector before every real target of the batch, and that target: (N,d), (N,).

    The batch is trimmed to its longest user first (bucketed batches are mostly shorter)."""
    width = max(int(b.lengths().max()), 1)
    items, types, gaps = b.items[:, -width:], b.types[:, -width:], b.gaps[:, -width:]
    targets = b.targets[:, -width:]
    memory0 = model.memory_from_prefix(b.prefix) if model.memory is not None else None
    out = model(items, types, gaps, memory0)  # (B,T,d)
    mask = targets != 0
    return out[mask], targets[mask]


def target_weights(b: SequenceBatch, type_weights: torch.Tensor) -> torch.Tensor:
    """The loss weight of each real target of the batch (in ``vectors_at_targets`` order): its
    event type's entry of ``type_weights`` (n_event_types,)."""
    width = max(int(b.lengths().max()), 1)
    targets, types = b.targets[:, -width:], b.target_types[:, -width:]
    return type_weights[types[targets != 0]]


def next_item_loss(
    model: InterestEncoder,
    b: SequenceBatch,
    n_negatives: int = 0,
    proposal: torch.Tensor | None = None,
    type_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-item cross-entropy at every real position of the batch; with
    ``type_weights`` (n_event_types,) the mean weighted by each target's event type.

    n_negatives <= 0 (or >= the catalogue): softmax over all items. Otherwise a sampled
    softmax: the target against n_negatives items drawn once per batch from ``proposal``
    (probabilities over 0..n_items, 0 at padding; None = uniform) and shared by all positions;
    a negative equal to the target is masked out. Each negative's logit is corrected by
    -log(K q(item)), which makes the loss an estimate of the full softmax cross-entropy (the
    positive's own term plus K importance-weighted samples of the rest of the partition
    function), whatever the proposal: popular items drawn often do not get over-penalised.
    """
    h, tgt = vectors_at_targets(model, b)
    weights = None if type_weights is None else target_weights(b, type_weights)
    n_items = model.cfg.n_items
    if n_negatives <= 0 or n_negatives >= n_items:
        return full_softmax_loss(h, model.item_embeddings(), tgt, weights=weights)
    emb = model.item_embeddings()
    if proposal is None:
        neg = torch.randint(1, n_items + 1, (n_negatives,))  # (K,)
        log_kq = torch.full((n_negatives,), math.log(n_negatives / n_items))
    else:
        neg = torch.multinomial(proposal, n_negatives, replacement=True)  # (K,)
        log_kq = (n_negatives * proposal[neg]).log()
    pos_logit = (h * emb[tgt]).sum(-1, keepdim=True)  # (N,1)
    neg_logits = h @ emb[neg].T - log_kq[None, :]  # (N,K)
    neg_logits = neg_logits.masked_fill(neg[None, :] == tgt[:, None], float("-inf"))
    logits = torch.cat([pos_logit, neg_logits], dim=1)
    if weights is None:
        return F.cross_entropy(logits, torch.zeros_like(tgt))
    losses = F.cross_entropy(logits, torch.zeros_like(tgt), reduction="none")
    return (losses * weights).sum() / weights.sum()


class _FullSoftmaxCrossEntropy(torch.autograd.Function):
    """Cross-entropy over all items, its gradients computed in the forward pass, chunk by chunk.

    Why: with a large catalogue the (N, n_items) logits dominate an epoch on CPU, and autograd
    makes several full-size tensors of them (masked logits, log-softmax, their gradients). Here
    each chunk of logits is made, turned into softmax - one-hot in place while it is still in
    cache, and used at once by the two gradient matmuls; nothing of size (N, n_items) outlives
    a chunk. The loss is the last op, so its backward only scales.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, row_weights):  # type: ignore[override]
        # h (N,d), weight (n_items+1,d) with row 0 padding, targets (N,) in 1..n_items,
        # row_weights (N,) or None (all 1)
        items = weight[1:]  # (V,d): padding is never a candidate
        n = h.shape[0]
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight)
        total = h.new_zeros(())
        for s in range(0, n, chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk] - 1  # (c,d), (c,)
            z = hc @ items.T  # (c,V)
            lse = torch.logsumexp(z, dim=1)  # (c,)
            row_loss = lse - z.gather(1, tc[:, None]).squeeze(1)
            p = z.sub_(lse[:, None]).exp_()  # softmax, in place
            p[torch.arange(len(tc)), tc] -= 1.0  # d (summed loss) / d logits
            if row_weights is not None:
                wc = row_weights[s : s + chunk]
                row_loss = row_loss * wc
                p.mul_(wc[:, None])
            total += row_loss.sum()
            torch.mm(p, items, out=grad_h[s : s + chunk])
            grad_w[1:].addmm_(p.T, hc)
        scale = n if row_weights is None else row_weights.sum()
        ctx.save_for_backward(grad_h / scale, grad_w / scale)
        return total / scale

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return grad_out * grad_h, grad_out * grad_w, None, None, None


def full_softmax_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = 64,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight[1:].T`` against ``targets`` (1-based item ids); the
    same value and gradients as ``F.cross_entropy(model.item_scores(h), targets)``, which
    tests/encoder/test_train.py compares it with. ``weights`` (N,): the mean weighted by row."""
    return _FullSoftmaxCrossEntropy.apply(h, weight, targets, chunk, weights)


def popularity_proposal(targets: torch.Tensor, n_items: int, mix: float = 0.5) -> torch.Tensor:
    """Negative-sampling distribution over 0..n_items: ``mix`` x training-target frequency plus
    the rest uniform, padding 0.

    Why: uniform negatives from a long-tail catalogue are mostly items nobody would rank high,
    so the model barely learns to separate the target from popular items, the hard negatives.
    The uniform part keeps every item sampled (and its logQ correction bounded).
    """
    counts = torch.bincount(targets[targets != 0].reshape(-1), minlength=n_items + 1).double()
    counts[0] = 0.0
    q = mix * counts / counts.sum().clamp(min=1.0)
    q[1:] += (1.0 - mix) / n_items
    return q.float()


def behaviour_weights(type_weights: dict[str, float], n_event_types: int) -> torch.Tensor | None:
    """(n_event_types,) loss weights from ``TrainConfig.type_weights``; None when every
    target weighs the same (the plain mean, no extra work per batch)."""
    out = torch.ones(n_event_types)
    for name, value in type_weights.items():
        try:
            index = event_type_index(name)
        except ValueError as exc:
            raise UserError(f"type_weights: {exc}") from None
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise UserError(f"type_weights: the weight of {name!r} must be above 0, not {value!r}")
        if index < n_event_types:
            out[index] = float(value)
    return None if bool((out == 1.0).all()) else out


def category_indices(inter: Interactions) -> torch.Tensor | None:
    """(n_items + 1,) each item's category index, 1.. in order of first appearance (0: the
    padding); None for a log without categories."""
    if inter.item_categories is None:
        return None
    index: dict[str, int] = {}
    rows = [index.setdefault(c, len(index) + 1) for c in inter.item_categories]
    return torch.tensor([0, *rows], dtype=torch.long)


def is_dense(inter: Interactions) -> bool:
    """Many events per user (ml-1m: 165) rather than a few (Amazon Beauty: 9)."""
    return inter.n_events / max(len(inter.sequences), 1) >= DENSE_EVENTS_PER_USER


def auto_dropout(inter: Interactions) -> float:
    """Dropout for the data's density, unless set: 0.1 for dense logs, which measured better
    than SASRec's 0.2 on ml-1m at equal training time; 0.2 for sparse ones, which with weight
    decay measured better than SASRec's 0.5 (and than 0.1) on Beauty (bench/quality.py)."""
    return 0.1 if is_dense(inter) else 0.2


def auto_weight_decay(inter: Interactions) -> float:
    """AdamW weight decay for the data's density, unless set. Why: on sparse logs most items
    are seen a handful of times and their embeddings memorise. On Beauty any decay from 0.05
    to 0.3 beat none, the values within the seed noise of each other, so 0.1. Dense logs:
    none, as decay on ml-1m stayed within the seed noise (bench/quality.py)."""
    return 0.0 if is_dense(inter) else 0.1


def auto_depth(inter: Interactions) -> dict[str, int]:
    """Layers and span for the data's density, unless either is set. Dense logs: 3 layers of
    span 67, the same receptive field (199) and state size as 2 of span 100, which measured
    better on ml-1m over three seeds in the same training time (bench/quality.py).
    Sparse logs keep 2 of span 100: on Beauty (histories far shorter than either span) 3
    layers measured worse."""
    return {"n_layers": 3, "span": 67} if is_dense(inter) else {"n_layers": 2, "span": 100}


def auto_negatives(positions: int, n_items: int, logits_per_epoch: float) -> int:
    """Sampled-softmax size that keeps an epoch's logits near the budget; 0 = full softmax.

    Why: on a CPU the output layer (positions x items per epoch) dominates an epoch, and a
    time-boxed run needs many epochs.
    """
    k = max(512, int(logits_per_epoch / max(positions, 1)))
    return 0 if k >= n_items else k


def training_split(
    inter: Interactions,
    cfg: EncoderConfig,
    tc: TrainConfig,
    prefix: int,
    gen: torch.Generator,
) -> tuple[SequenceBatch, SequenceBatch | None]:
    """The training examples and the validation sample (None for logs too small to validate).

    The sample is drawn first so that, with ``train_on_validation``, exactly its users keep
    their validation event out of training.
    """
    try:
        valid_set: SequenceBatch | None = eval_batch(inter, "valid", cfg.max_len, prefix)
    except UserError:
        valid_set = None  # tiny logs: train without early stopping
    if valid_set is not None and 0 < tc.val_users < len(valid_set):
        pick = torch.randperm(len(valid_set), generator=gen)[: tc.val_users]
        valid_set = valid_set.select(pick.sort().values)
    held_out = None
    if tc.train_on_validation:
        held_out = set() if valid_set is None else set(valid_set.users.tolist())
    train_set = train_batch(
        inter, cfg.max_len, prefix, every_window=tc.every_window, held_out=held_out
    )
    return train_set, valid_set


def train(
    data: Path,
    out: Path,
    epochs: int | None = None,
    max_minutes: float | None = None,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Train on a log and write model.pt, config.json, vocab.json, metrics.json to ``out``.

    ``overrides`` set EncoderConfig or TrainConfig fields by name (experiments, tests).
    Returns a JSON-able summary.
    """
    t_start = time.monotonic()
    enc_fields = set(EncoderConfig.__dataclass_fields__) - {"n_items", "n_categories"}
    trn_fields = set(TrainConfig.__dataclass_fields__)
    unknown = set(overrides) - enc_fields - trn_fields
    if unknown:
        raise UserError(f"unknown training option(s): {sorted(unknown)}")
    tc = TrainConfig(**{k: v for k, v in overrides.items() if k in trn_fields})
    if tc.negative_sampling not in ("uniform", "popularity"):
        raise UserError(
            f"negative_sampling must be 'uniform' or 'popularity', not {tc.negative_sampling!r}"
        )
    if tc.lr_schedule not in SCHEDULES:
        raise UserError(f"lr_schedule must be one of {SCHEDULES}, not {tc.lr_schedule!r}")
    if epochs is not None:
        if epochs < 1:
            raise UserError("--epochs must be at least 1")
        tc.max_epochs = epochs
    if max_minutes is not None:
        if max_minutes <= 0:
            raise UserError("--max-minutes must be positive")
        tc.max_minutes = max_minutes
    torch.set_num_threads(tc.threads or _cores())
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)

    enc_over = {k: v for k, v in overrides.items() if k in enc_fields}
    n_buckets = enc_over.get("n_time_buckets", EncoderConfig.n_time_buckets)
    inter = load_interactions(Path(data), n_time_buckets=n_buckets)
    seen_features = {
        "uses_event_types": any(
            bool((q.types != DEFAULT_EVENT_TYPE).any()) for q in inter.sequences
        ),
        "uses_time_gaps": any(bool(q.gaps.any()) for q in inter.sequences),
    }
    if "dropout" not in enc_over:
        enc_over["dropout"] = auto_dropout(inter)
    if "n_layers" not in enc_over and "span" not in enc_over:
        enc_over.update(auto_depth(inter))
    if tc.weight_decay is None:
        tc.weight_decay = auto_weight_decay(inter)
    categories = category_indices(inter) if tc.item_categories else None
    n_categories = 0 if categories is None else int(categories.max())
    cfg = EncoderConfig(
        n_items=inter.n_items, n_categories=n_categories, **{**seen_features, **enc_over}
    )
    type_weights = behaviour_weights(tc.type_weights, cfg.n_event_types)
    rule = exclusion_rule(tc.exclude_seen_types)
    prefix = memory_horizon(cfg.memory_decay) if cfg.use_memory else 0
    train_set, valid_set = training_split(inter, cfg, tc, prefix, gen)
    if not cfg.uses_event_types:  # trained as it will be served: every event the default type
        train_set = inputs_without_types(train_set)
        valid_set = None if valid_set is None else inputs_without_types(valid_set)

    n_neg = tc.n_negatives
    if n_neg < 0:
        n_neg = auto_negatives(
            int((train_set.targets != 0).sum()), cfg.n_items, tc.logits_per_epoch
        )
    proposal = None
    if n_neg > 0 and tc.negative_sampling == "popularity":
        proposal = popularity_proposal(train_set.targets, cfg.n_items)
    model = InterestEncoder(cfg)
    if categories is not None:
        model.item_emb.category_of.copy_(categories)
    opt = torch.optim.AdamW(
        model.parameters(), lr=tc.lr, betas=(0.9, 0.98), weight_decay=tc.weight_decay
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    vocab = {
        "items": inter.item_ids,
        "event_types": list(EVENT_TYPES[: cfg.n_event_types]),
        VOCAB_COUNTS_KEY: training_counts(inter)[1:].tolist(),
    }
    (out / "vocab.json").write_text(json.dumps(vocab))

    (out / "history.jsonl").write_text("")
    budget_s = tc.max_minutes * 60.0
    lengths = train_set.lengths()
    history: list[dict[str, float]] = []
    best, best_epoch, stale, stop = -1.0, 0, 0, "max_epochs"
    epoch_s = 0.0
    steps_per_epoch = math.ceil(len(lengths) / tc.batch_size)
    step = 0
    lr_at = LearningRate(tc, steps_per_epoch * tc.max_epochs, budget_s, t_start)

    for epoch in range(1, tc.max_epochs + 1):
        elapsed = time.monotonic() - t_start
        if epoch > 1 and elapsed + epoch_s > budget_s:
            stop = "max_minutes"
            break
        t_epoch = time.monotonic()
        model.train()
        batches = _length_bucketed_batches(lengths, tc.batch_size, gen)
        total, seen = 0.0, 0
        bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not progress)
        for idx in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            step += 1
            loss = next_item_loss(model, train_set.select(idx), n_neg, proposal, type_weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        record = {"epoch": float(epoch), "loss": total / max(seen, 1), "lr": lr_at(step)}
        if valid_set is not None:
            val = rank_split(model, inter, valid_set, "valid", exclude_types=rule)
            record.update({f"val_{k}": v for k, v in val.items() if k in ("ndcg@10", "hr@10")})
            score = val["ndcg@10"]
        else:
            score = -record["loss"]
        epoch_s = time.monotonic() - t_epoch
        record["seconds"] = epoch_s
        history.append(record)
        if progress:
            tqdm.write(json.dumps({k: round(v, 5) for k, v in record.items()}))
        with (out / "history.jsonl").open("a") as f:  # follow a long run with tail -f
            f.write(json.dumps(record) + "\n")
        if not math.isfinite(record["loss"]):
            raise RuntimeError("training diverged (loss is not finite)")
        if score > best:
            best, best_epoch, stale = score, epoch, 0
            torch.save(model.state_dict(), out / "model.pt")
        else:
            stale += 1
        if valid_set is not None and stale >= tc.patience:
            if tc.lr_schedule == "constant":
                stop = "early_stopping"
                break
            lr_at.start_decay(step)
        if lr_at.decayed(step):
            stop = "early_stopping"
            break

    minutes = (time.monotonic() - t_start) / 60.0
    summary: dict[str, Any] = {
        "data": str(data),
        "users": len(inter.sequences),
        "items": inter.n_items,
        "events": inter.n_events,
        "epochs": len(history),
        "best_epoch": best_epoch,
        "best_val_ndcg@10": best if valid_set is not None else None,
        "stopped": stop,
        "train_minutes": round(minutes, 2),
        "softmax": "full" if n_neg == 0 else f"sampled ({n_neg} {tc.negative_sampling} negatives)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": cfg.to_dict(),
        "train_config": asdict(tc),
    }
    (out / "metrics.json").write_text(json.dumps({**summary, "history": history}, indent=2))
    return summary
