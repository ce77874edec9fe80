"""Leave-one-out event weights computed plainly with the torch model: the reference.

The same function as export/explain.py's ``leave_one_out`` (which runs the exported graph in
one batch), written the plainest way: the model's ``state_from_window`` over each variant
window, one at a time, with the variant's gaps recomputed from its timestamps from scratch
and its whole window in the attention (the exported rebuild keeps only the last
``receptive_field`` events when given a memory; the two agree because nothing older reaches
the last position's attention). Compared in tests/export/test_explain.py.

weight[k, j] = score(k | window) - score(k | window without event j). Without event j the
persisted memory m (after the window's last event) loses j's term and its older terms
decay one step less; DecayedMemory being linear (and skipping events the model does not
know), that follows from m and the window alone (``_without``).
"""

from __future__ import annotations

import numpy as np
import torch

from encoder.features import window_gaps
from encoder.model import InterestEncoder


@torch.no_grad()
def leave_one_out(
    model: InterestEncoder,
    items: np.ndarray,
    types: np.ndarray,
    timestamps_ms: np.ndarray,
    memory: np.ndarray | None,
    targets: np.ndarray,
    use_gaps: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores (K,), weights (K, T)) as float64; arguments as export/explain.py's."""
    items_l = [int(i) for i in items]
    types_l = [int(t) for t in types]
    ts_l = [int(t) for t in timestamps_ms]
    emb = model.item_embeddings()[torch.as_tensor(np.asarray(targets, np.int64))]  # (K,d)
    m = None if memory is None else torch.as_tensor(memory, dtype=torch.float32).reshape(1, -1)

    def scores(keep: list[int], mem: torch.Tensor | None) -> np.ndarray:
        """Target scores after the window's events ``keep`` (positions, in order)."""
        gaps = window_gaps([ts_l[i] for i in keep], model.cfg.n_time_buckets, use_gaps)
        kept_items, kept_types = [items_l[i] for i in keep], [types_l[i] for i in keep]
        vector = _vector(model, kept_items, kept_types, gaps, mem)
        return (vector.double() @ emb.double().T).numpy()

    everything = list(range(len(items_l)))
    full = scores(everything, m)
    weights = np.zeros((len(emb), len(items_l)))
    for j in everything:
        if items_l[j] > 0:
            others = [i for i in everything if i != j]
            weights[:, j] = full - scores(others, _without(model, m, items_l, j))
    return full, weights


def _without(
    model: InterestEncoder, m: torch.Tensor | None, items: list[int], j: int
) -> torch.Tensor | None:
    """The memory without event j (None stays None: recomputed from the window).

    m = gamma^(n+1) (memory before j) + the decayed sum over j and the known events after it;
    without j: (memory before j) decayed n times + the decayed sum over the later events.
    """
    if m is None or model.memory is None:
        return m
    older = m - _decayed_sum(model, items[j:])  # gamma^(n+1) (memory before j)
    without = older / model.memory.gamma + _decayed_sum(model, items[j + 1 :])
    if sum(i > 0 for i in items) == 1 and without.abs().max() <= 1e-5 * max(m.abs().max(), 1.0):
        return None  # nothing of the user left: the user without events (export/explain.py)
    return without


def _decayed_sum(model: InterestEncoder, items: list[int]) -> torch.Tensor:
    """The model's memory after ``items`` from zero (events it does not know skipped): (1, d)."""
    known = [i for i in items if i > 0]
    if not known:
        return torch.zeros(1, model.cfg.d_model)
    return model.memory_from_prefix(torch.tensor([known], dtype=torch.long))


def _vector(
    model: InterestEncoder,
    items: list[int],
    types: list[int],
    gaps: list[int],
    memory: torch.Tensor | None,
) -> torch.Tensor:
    """The interest vector (d,) after a window: its known events only, as the worker feeds
    them; with no known event, one padding position (what the exported rebuild runs), or no
    vector at all (zeros) without a memory."""
    known = [i for i, item in enumerate(items) if item > 0]
    if not known and memory is None:
        return torch.zeros(model.cfg.d_model)
    rows = [[items[i] for i in known], [types[i] for i in known], [gaps[i] for i in known]]
    if not known:
        rows = [[0], [0], [0]]
    it, ty, ga = (torch.tensor([r], dtype=torch.long) for r in rows)
    return model.state_from_window(it, ty, ga, memory)[0][0]
