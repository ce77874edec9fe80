"""`interest evaluate --report` on a tiny trained model: the numbers agree with `evaluate`,
the penalty buys reach, the groups cover every user, and bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from encoder.evaluate import evaluate
from encoder.report import build_report
from encoder.train import train
from tests.conftest import interest

TINY = {"d_model": 16, "n_heads": 2, "span": 4, "max_len": 12, "dropout": 0.0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A log whose items are Zipf-popular, and a model trained on it for a few epochs."""
    tmp = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    weights = 1 / np.arange(1, 41)
    lines = []
    for u in range(60):
        items = rng.choice(
            40, size=int(rng.integers(4, 16)), replace=False, p=weights / weights.sum()
        )
        lines += [f"u{u} i{i}" for i in items]
    data = tmp / "log.txt"
    data.write_text("\n".join(lines) + "\n")
    train(data, tmp / "model", epochs=3, progress=False, **TINY)
    return tmp / "model", data


def test_the_report_agrees_with_evaluate_and_the_penalty_buys_reach(
    trained: tuple[Path, Path],
) -> None:
    model, data = trained
    report = build_report(model, data, popularity_penalty=0.5, penalties=[0.0, 20.0])
    assert [row["penalty"] for row in report["tradeoff"]] == [0.0, 0.5, 20.0]
    accuracy = report["systems"]["model"]["accuracy"]
    plain = evaluate(model, data, popularity_penalty=0.5)
    assert accuracy["ndcg@10"] == pytest.approx(plain["ndcg@10"])
    assert accuracy["hr@10"] == pytest.approx(plain["hr@10"])
    assert accuracy["ndcg@10_ci"][0] <= accuracy["ndcg@10"] <= accuracy["ndcg@10_ci"][1]
    by_penalty = {row["penalty"]: row for row in report["tradeoff"]}
    assert by_penalty[0.5]["ndcg@10"] == pytest.approx(accuracy["ndcg@10"])
    # A heavy penalty ranks the least trained-on items first: more tail, flatter exposure.
    assert by_penalty[20.0]["long_tail_share"] > by_penalty[0.0]["long_tail_share"]
    assert by_penalty[20.0]["average_popularity"] < by_penalty[0.0]["average_popularity"]
    baseline = report["systems"]["popularity"]["exposure"]
    assert baseline["average_popularity"] > by_penalty[20.0]["average_popularity"]
    groups = report["groups"]
    assert list(groups) == ["activity"]
    assert sum(g["users"] for g in groups["activity"]) == report["users"] == 60
    assert len(report["lorenz"]["model"]) == 101


def test_the_command_writes_the_page_and_refuses_bad_input_in_one_line(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = trained
    users = tmp_path / "users.dat"
    users.write_text("".join(f"{u}::{'FM'[u % 2]}::25::1::1\n" for u in range(60)))
    ids = tmp_path / "map.txt"
    ids.write_text("".join(f"u{u} {u}\n" for u in range(60)))
    out = tmp_path / "report"
    args = ["evaluate", "--model", str(model), "--data", str(data), "--report", str(out)]
    done = interest(*args, "--users", str(users), "--user-map", str(ids), "--penalties", "0,1")
    assert done.returncode == 0, done.stderr.decode()
    printed = json.loads(done.stdout)
    assert printed["report"] == str(out / "report.html")
    numbers = json.loads((out / "report.json").read_text())
    assert [g["group"] for g in numbers["groups"]["gender"]] == ["female", "male"]
    html = (out / "report.html").read_text()
    for png in ("tradeoff.png", "groups.png", "exposure.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG") and png in html

    ids.write_text("u0 0\nu1\n")
    bad = interest(*args, "--users", str(users), "--user-map", str(ids))
    assert bad.returncode == 2
    assert bad.stderr.decode().strip().splitlines() == [
        f"error: {ids}:2: expected 2 fields, got 'u1'"
    ]
    negative = interest(*args, "--popularity-penalty", "-1")
    assert negative.returncode == 2 and b"penalty" in negative.stderr
    assert len(negative.stderr.decode().strip().splitlines()) == 1
