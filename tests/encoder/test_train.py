"""Training on a tiny synthetic log: the loss falls, the model directory round-trips through
evaluate, bad options fail with a UserError. Seconds, not minutes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from encoder.data import load_interactions, memory_horizon, train_batch
from encoder.evaluate import evaluate
from encoder.model import EncoderConfig, InterestEncoder
from encoder.train import next_item_loss, train
from interest.errors import UserError

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


@pytest.mark.parametrize("n_negatives", [0, 8])
def test_a_few_steps_reduce_the_loss(tmp_path: Path, n_negatives: int) -> None:
    torch.manual_seed(0)
    inter = load_interactions(_synthetic_log(tmp_path / "d.txt"))
    cfg = EncoderConfig(n_items=inter.n_items, **TINY)
    batch = train_batch(inter, cfg.max_len, memory_horizon(cfg.memory_decay))
    model = InterestEncoder(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = next_item_loss(model, batch, n_negatives)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


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
