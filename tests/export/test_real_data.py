"""ml-1m sequences through the default-size model: step chain == torch, top-10 == torch ranking.

Reads ../shared/data/ml-1m.txt (never committed); skipped where it is absent.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder.model import EncoderConfig, InterestEncoder
from export.bundle import export_bundle, save_model_dir
from export.runtime import EncoderRuntime

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ml-1m.txt"
TOL = 1e-4

pytestmark = pytest.mark.data


@pytest.mark.skipif(not DATA.is_file(), reason=f"{DATA} not found (MovieLens is not committed)")
def test_default_model_on_ml1m_histories(tmp_path: Path) -> None:
    seqs: dict[str, list[str]] = defaultdict(list)
    with DATA.open() as f:
        for line in f:
            user, item = line.split()
            seqs[user].append(item)
    vocab = sorted({i for s in seqs.values() for i in s}, key=int)
    torch.manual_seed(0)
    model = InterestEncoder(EncoderConfig(n_items=len(vocab))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = export_bundle(save_model_dir(model, vocab, tmp_path / "m"), tmp_path / "b")
    rt = EncoderRuntime.load(bundle)
    T = 2 * rt.receptive_field + 2  # well past the receptive field
    users = [u for u, s in seqs.items() if len(s) >= T][:8]
    items = np.stack([rt.index_of(seqs[u][:T]) for u in users])
    assert (items > 0).all()
    types = np.zeros_like(items)
    gaps = np.zeros_like(items)
    with torch.no_grad():
        full = model(*(torch.from_numpy(a) for a in (items, types, gaps))).numpy()
    states = rt.initial_state(len(users))
    worst = 0.0
    for t in range(T):
        vec, states = rt.step(states, items[:, t], types[:, t], gaps[:, t])
        worst = max(worst, float(np.abs(vec - full[:, t]).max()))
    assert worst <= TOL

    rf = rt.receptive_field
    vec_r, _ = rt.rebuild(items[:, -rf:], types[:, -rf:], gaps[:, -rf:], memory=states.memory)
    assert float(np.abs(vec_r - vec).max()) <= TOL

    top, _ = rt.top_k(vec, 10, exclude=list(items))
    with torch.no_grad():
        scores = model.item_scores(torch.from_numpy(vec)).numpy()
    for b in range(len(users)):
        scores[b, items[b]] = -np.inf
    np.testing.assert_array_equal(top, np.argsort(-scores, axis=1, kind="stable")[:, :10])
