"""Training on a tiny synthetic log: the loss falls, the model directory round-trips through
evaluate, bad options fail with a UserError. Seconds, not minutes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.errors import UserError
from encoder.data import load_interactions, memory_horizon, train_batch
from encoder.evaluate import evaluate
from encoder.model import EncoderConfig, InterestEncoder
from encoder.train import (
    TrainConfig,
    full_softmax_loss,
    next_item_loss,
    popularity_proposal,
    train,
    training_split,
)

TINY = {"d_model": 16, "n_heads": 2, "span": 4, "max_len": 12, "dropout": 0.0}


def _synthetic_log(path: Path, users: int = 40, items: int = 30, length: int = 12) -> Path:
    """Users walk through the catalogue in steps of 1 from a random start: easy to learn."""
    g = torch.Generator().manual_seed(0)
    lines = []
    for u in range(users):
        start = int(torch.randint(0, items, (1,), generator=g))
        lines += [f"user{u} item{(start + t) % items}" for t in range(length)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("train_on_validation", [False, True])
def test_the_validation_sample_never_trains_on_its_validation_events(
    tmp_path: Path, train_on_validation: bool
) -> None:
    inter = load_interactions(_synthetic_log(tmp_path / "d.txt", length=6))
    cfg = EncoderConfig(n_items=inter.n_items, **TINY)
    tc = TrainConfig(val_users=10, train_on_validation=train_on_validation)
    train_set, valid_set = training_split(inter, cfg, tc, 0, torch.Generator().manual_seed(0))
    assert valid_set is not None and len(valid_set) == 10
    sample = set(valid_set.users.tolist())
    for u, seq in enumerate(inter.sequences):
        trained = train_set.targets[train_set.users == u]
        trained = trained[trained != 0].tolist()
        # events 1..3 always train; event 4 (validation) only outside the sample, if asked;
        # event 5 (test) never
        expected = seq.items[1:4].tolist()
        if train_on_validation and u not in sample:
            expected.append(int(seq.items[4]))
        assert trained == expected


@pytest.mark.parametrize(("n_negatives", "popular"), [(0, False), (8, False), (8, True)])
def test_a_few_steps_reduce_the_loss(tmp_path: Path, n_negatives: int, popular: bool) -> None:
    torch.manual_seed(0)
    inter = load_interactions(_synthetic_log(tmp_path / "d.txt"))
    cfg = EncoderConfig(n_items=inter.n_items, **TINY)
    batch = train_batch(inter, cfg.max_len, memory_horizon(cfg.memory_decay))
    proposal = popularity_proposal(batch.targets, cfg.n_items) if popular else None
    model = InterestEncoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = next_item_loss(model, batch, n_negatives, proposal)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_fused_full_softmax_matches_autograd_cross_entropy(chunk: int, weighted: bool) -> None:
    """The fast path (gradients made chunk by chunk in the forward) against the plain one,
    unweighted and with per-target weights (the training option type_weights)."""
    torch.manual_seed(0)
    model = InterestEncoder(EncoderConfig(n_items=50, **TINY))
    with torch.no_grad():
        model.item_emb.weight.normal_(0, 1.0)
    h = torch.randn(23, 16)
    targets = torch.randint(1, 51, (23,))
    weights = torch.rand(23) * 3 + 0.5 if weighted else torch.ones(23)
    results = []
    for fast in (False, True):
        hh = h.clone().requires_grad_()
        model.zero_grad()
        if fast:
            given = weights if weighted else None
            loss = full_softmax_loss(hh, model.item_embeddings(), targets, chunk, given)
        else:
            rows = torch.nn.functional.cross_entropy(
                model.item_scores(hh), targets, reduction="none"
            )
            loss = (rows * weights).sum() / weights.sum()
        (2.0 * loss).backward()  # a non-unit upstream gradient must be carried through
        results.append((loss.detach(), hh.grad, model.item_emb.weight.grad.clone()))
    (ref_loss, ref_h, ref_w), (loss, grad_h, grad_w) = results
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad_h, ref_h)
    torch.testing.assert_close(grad_w, ref_w)
    assert float(grad_w[0].abs().sum()) == 0.0  # padding is never a candidate


def test_popularity_proposal_is_a_distribution_over_real_items() -> None:
    targets = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 1]])  # item 1 four times, 2 once, 3 never
    q = popularity_proposal(targets, n_items=3, mix=0.5)
    assert q[0] == 0.0
    assert torch.isclose(q.sum(), torch.tensor(1.0))
    assert q[1] > q[2] > q[3] > 0.0  # popular first, unseen items still sampled
    assert torch.isclose(q[3], torch.tensor(0.5 / 3))


def test_logq_corrected_sampled_loss_estimates_the_full_softmax(tmp_path: Path) -> None:
    """With a popularity-skewed proposal the corrected sampled loss still estimates the full
    cross-entropy; uncorrected, it would over-penalise the popular items drawn most often."""
    torch.manual_seed(0)
    inter = load_interactions(_synthetic_log(tmp_path / "d.txt", items=3000))
    cfg = EncoderConfig(n_items=inter.n_items, **TINY)  # ~480 items seen
    batch = train_batch(inter, cfg.max_len, memory_horizon(cfg.memory_decay))
    model = InterestEncoder(cfg).eval()
    k = cfg.n_items - 1  # still the sampled path
    with torch.no_grad():
        model.item_emb.weight.normal_(0, 0.5)  # spread-out scores make any bias visible
        q = torch.zeros(cfg.n_items + 1)
        q[1:] = torch.linspace(1.0, 30.0, cfg.n_items)  # popular items drawn 30x as often
        q /= q.sum()
        full = next_item_loss(model, batch, 0).item()
        draws = [next_item_loss(model, batch, k, q).item() for _ in range(20)]
    assert abs(sum(draws) / len(draws) - full) < 0.05 * full


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_decaying_schedules_end_near_zero(tmp_path: Path, schedule: str) -> None:
    data = _synthetic_log(tmp_path / "d.txt")
    summary = train(
        data,
        tmp_path / "m",
        epochs=4,
        progress=False,
        lr_schedule=schedule,
        lr=0.01,
        warmup_steps=1,
        **TINY,
    )
    history = (tmp_path / "m" / "history.jsonl").read_text().splitlines()
    rates = [json.loads(line)["lr"] for line in history]  # the rate after each epoch
    assert summary["epochs"] == 4
    assert rates == sorted(rates, reverse=True) and rates[-1] < 1e-3
    if schedule == "wsd":  # stable until the last 30%, then linear
        assert rates[:2] == [0.01, 0.01] and 0.0 < rates[2] < 0.01
    else:
        assert rates[0] < 0.01


def test_a_plateau_stops_constant_and_starts_the_wsd_decay_early(tmp_path: Path) -> None:
    """lr ~0 after warm-up: validation never improves. The constant schedule stops after
    `patience` epochs; wsd instead starts its decay then (lasting 3/7 of the run so far, here
    under one epoch), so it stops an epoch later with the rate at 0, long before max_epochs."""
    data = _synthetic_log(tmp_path / "d.txt")
    common = {"epochs": 20, "progress": False, "patience": 1, "lr": 1e-9, "warmup_steps": 1}
    common["decay_fraction"] = 0.3  # decay lasts 3/7 of the run so far
    common.update(TINY)
    constant = train(data, tmp_path / "c", lr_schedule="constant", **common)
    wsd = train(data, tmp_path / "w", lr_schedule="wsd", **common)
    assert constant["stopped"] == "early_stopping" and constant["epochs"] == 2
    assert wsd["stopped"] == "early_stopping" and wsd["epochs"] == 3
    rates = [json.loads(line)["lr"] for line in (tmp_path / "w" / "history.jsonl").open()]
    assert rates[0] == rates[1] == 1e-9 and rates[2] == 0.0


@pytest.mark.parametrize(("length", "dropout", "weight_decay"), [(12, 0.2, 0.1), (24, 0.1, 0.0)])
def test_regularisation_follows_the_data_density_unless_set(
    tmp_path: Path, length: int, dropout: float, weight_decay: float
) -> None:
    """Sparse logs (< 20 events per user) get more dropout and weight decay than dense ones;
    what was used is recorded with the model, and an explicit setting wins."""
    data = _synthetic_log(tmp_path / "d.txt", length=length)
    shape = {k: v for k, v in TINY.items() if k != "dropout"}
    auto = train(data, tmp_path / "a", epochs=1, progress=False, **shape)
    assert auto["config"]["dropout"] == dropout
    assert auto["train_config"]["weight_decay"] == weight_decay
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["dropout"] == dropout
    chosen = train(
        data, tmp_path / "c", epochs=1, progress=False, dropout=0.3, weight_decay=0.05, **shape
    )
    assert chosen["config"]["dropout"] == 0.3
    assert chosen["train_config"]["weight_decay"] == 0.05


@pytest.mark.parametrize(("length", "layers", "span"), [(12, 2, 100), (24, 3, 67)])
def test_depth_follows_the_data_density_unless_set(
    tmp_path: Path, length: int, layers: int, span: int
) -> None:
    """Dense logs get 3 layers of span 67, sparse ones 2 of span 100: the same receptive
    field; setting either field keeps the defaults for the other."""
    data = _synthetic_log(tmp_path / "d.txt", length=length)
    shape = {k: v for k, v in TINY.items() if k != "span"}
    auto = train(data, tmp_path / "a", epochs=1, progress=False, **shape)
    assert (auto["config"]["n_layers"], auto["config"]["span"]) == (layers, span)
    assert auto["config"]["receptive_field"] == 199
    chosen = train(data, tmp_path / "c", epochs=1, progress=False, n_layers=1, **shape)
    assert (chosen["config"]["n_layers"], chosen["config"]["span"]) == (1, 100)


def test_train_writes_a_model_that_evaluate_reads(tmp_path: Path) -> None:
    data = _synthetic_log(tmp_path / "d.txt")
    summary = train(data, tmp_path / "m", epochs=3, progress=False, **TINY)
    json.dumps(summary)  # JSON-able
    assert summary["epochs"] == 3
    for name in ("model.pt", "config.json", "vocab.json", "metrics.json"):
        assert (tmp_path / "m" / name).is_file()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["receptive_field"] == 7
    result = evaluate(tmp_path / "m", data)
    for key in (
        "ndcg@10",
        "hr@10",
        "ndcg@20",
        "hr@20",
        "map@10",
        "mrr",
        "coverage@10",
        "sampled_hr@10",
        "sampled_ndcg@10",
    ):
        assert 0.0 <= result[key] <= 1.0, key


def test_bad_inputs_are_user_errors(tmp_path: Path) -> None:
    data = _synthetic_log(tmp_path / "d.txt")
    with pytest.raises(UserError):
        train(tmp_path / "missing.txt", tmp_path / "m")
    with pytest.raises(UserError):
        train(data, tmp_path / "m", epochs=0)
    with pytest.raises(UserError):
        train(data, tmp_path / "m", max_minutes=-1)
    with pytest.raises(UserError):
        train(data, tmp_path / "m", no_such_option=1)
    with pytest.raises(UserError):
        train(data, tmp_path / "m", lr_schedule="linear")
    with pytest.raises(UserError):
        train(data, tmp_path / "m", negative_sampling="hard")
    with pytest.raises(UserError):
        evaluate(tmp_path / "not-a-model", data)


def test_config_records_whether_the_data_had_types_and_times(tmp_path: Path) -> None:
    sasrec = _synthetic_log(tmp_path / "log.txt")
    train(sasrec, tmp_path / "a", epochs=1, progress=False, **TINY)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["uses_event_types"] is False and config["uses_time_gaps"] is False

    events = tmp_path / "log.jsonl"
    lines = []
    for n, line in enumerate(sasrec.read_text().splitlines()):
        user, item = line.split()
        kind = "purchase" if n % 5 == 0 else "click"
        lines.append(
            json.dumps(
                {
                    "user_id": user,
                    "item_id": item,
                    "event_type": kind,
                    "timestamp": 1_700_000_000_000 + n * 60_000,
                }
            )
        )
    events.write_text("\n".join(lines) + "\n")
    train(events, tmp_path / "b", epochs=1, progress=False, **TINY)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["uses_event_types"] is True and config["uses_time_gaps"] is True
