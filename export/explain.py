"""Which events of a user's window drove a recommended item: exact leave-one-out, no torch.

For a window (oldest first) and its persisted long-term memory, the weight of event j for
item k is how much k's score drops when j is taken out of the user's history:

    weight[k, j] = score(k | window) - score(k | window without event j)

computed by the model itself, not by a similarity heuristic. "Without event j" removes j from
both paths the model has:

* attention: the token is gone, and the next event's time-gap bucket is recomputed from its
  new predecessor (as streams/encoder_recommender.py's ``_features`` computes gaps, so the
  variant is exactly the window the worker would have seen);
* memory: DecayedMemory is linear, m_t = gamma * m_{t-1} + e(item_t) over known events, so
  the persisted memory without j follows from m and the window alone: j's term
  gamma^n e(item_j) goes (n the known events after j), and every older event, the ones
  before the window included, decays one step less (``_memories_without``).

The window and all its one-event-less variants go through one batched
``EncoderRuntime.rebuild`` (full.onnx). Scores are dot products with the item embeddings, as
the worker ranks. Events whose item the model does not know are not in its input: weight 0.

The memory path is exact for any window, given the memory persisted after it. The attention
path is exact for the history the window stands for when the window is the whole history, or
holds at least ``receptive_field + 2`` known events: a variant has one known event fewer, and
the window's first event, whose gap from its predecessor the window cannot know, must lie
outside every variant's receptive field. A shorter window of a longer history gives the
weights of that window as the worker would rebuild it.

Reference: encoder/explain.py (torch, the model's forward over each variant), compared in
tests/export/test_explain.py. Imported by the worker side: never import torch here.
"""

from __future__ import annotations

import numpy as np

from encoder import features
from export.runtime import EncoderRuntime

__all__ = ["leave_one_out", "top_events", "window_gaps"]


def window_gaps(timestamps_ms: np.ndarray, n_buckets: int, use_gaps: bool = True) -> np.ndarray:
    """`encoder.features.window_gaps` as an array."""
    ts = np.asarray(timestamps_ms).tolist()
    return np.array(features.window_gaps(ts, n_buckets, use_gaps), np.int64)


def _gap(milliseconds: int, n_buckets: int) -> int:
    return features.time_gap_bucket(milliseconds / 1000, n_buckets)


def leave_one_out(
    rt: EncoderRuntime,
    items: np.ndarray,
    types: np.ndarray,
    timestamps_ms: np.ndarray,
    memory: np.ndarray | None,
    targets: np.ndarray,
    use_gaps: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of ``targets`` for the window and each event's weight for each target.

    items: (T,) model indices (``rt.index_of``; UNKNOWN or 0 for items the model lacks);
    types: (T,) event type indices; timestamps_ms: (T,); memory: the persisted memory after
    the window's last event, (d,) or (1, d), or None to recompute it from the window (then the
    window must be the whole history); targets: (K,) model indices 1..n_items; use_gaps: False
    for a model trained without timestamps (it saw only the unknown gap).

    Returns (scores (K,) float32, weights (K, T) float32), weights[k, j] for window position j.
    """
    items = np.asarray(items, np.int64).reshape(-1)
    types = np.asarray(types, np.int64).reshape(-1)
    targets = np.asarray(targets, np.int64).reshape(-1)
    if not (len(items) == len(types) == len(timestamps_ms)):
        raise ValueError("items, types and timestamps_ms need one entry per event")
    if ((targets < 1) | (targets > rt.n_items)).any():
        raise ValueError(f"targets must be model item indices 1..{rt.n_items}")
    n_buckets = rt.n_time_buckets
    gaps = window_gaps(timestamps_ms, n_buckets, use_gaps)
    dropped = np.flatnonzero(items > 0)  # events the model sees: one variant each
    v_items, v_types, v_gaps = _variants(
        items, types, gaps, timestamps_ms, dropped, n_buckets, use_gaps
    )
    memories = (
        None
        if memory is None
        else _no_history_left(_memories_without(rt, items, memory, dropped), len(dropped))
    )
    # row 0 the window, row 1 + r the window without event dropped[r]
    vectors, _ = rt.rebuild([items, *v_items], [types, *v_types], [gaps, *v_gaps], memory=memories)
    # float64: a weight is a difference of two nearly equal scores
    scores = vectors.astype(np.float64) @ rt.item_embeddings[targets].T.astype(np.float64)
    weights = np.zeros((len(targets), len(items)), np.float32)
    weights[:, dropped] = (scores[0][None, :] - scores[1:]).T
    return scores[0].astype(np.float32), weights


def top_events(weights_row: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The ``n`` events that raised an item's score most: (window position, weight), biggest
    first. Events that lowered the score (or did not count) explain nothing: left out."""
    w = np.asarray(weights_row, np.float64)
    order = np.argsort(-w, kind="stable")[:n]
    return [(int(j), float(w[j])) for j in order if w[j] > 0]


def _variants(
    items: np.ndarray,
    types: np.ndarray,
    gaps: np.ndarray,
    timestamps_ms: np.ndarray,
    dropped: np.ndarray,
    n_buckets: int,
    use_gaps: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items, types and gaps (J, T-1) of the window without event j, for each j of ``dropped``.

    Only j's successor changes its gap: it now follows j's predecessor, or opens the window.
    """
    width = len(items) - 1
    cols = np.arange(width)
    index = cols[None, :] + (cols[None, :] >= dropped[:, None])  # (J, T-1): all but j
    v_items, v_types, v_gaps = items[index], types[index], gaps[index]
    ts = np.asarray(timestamps_ms).tolist()
    for row, j in enumerate(dropped.tolist()):
        if j < width:  # j's successor is now at position j
            v_gaps[row, j] = _gap(ts[j + 1] - ts[j - 1], n_buckets) if j and use_gaps else 0
    return v_items, v_types, v_gaps


def memory_with(
    rt: EncoderRuntime, items: np.ndarray, position: int, memory: np.ndarray
) -> np.ndarray:
    """The persisted memory once the window's event at ``position`` (oldest first; an event
    that arrived out of time order) is counted in it, from the memory without it: its share
    gamma^n e(item) joins (n the known events after it), and every older event, the ones
    before the window included, decays one step more. The exact inverse of what
    ``_memories_without`` takes out: m' = gamma (m - later) + share + later."""
    m = np.asarray(memory, np.float32).reshape(rt.d_model)
    items = np.asarray(items, np.int64).reshape(-1)
    config = rt.manifest["config"]
    if items[position] <= 0 or not config.get("use_memory", True):
        return m  # an event the model does not know neither decays nor adds
    gamma = float(config["memory_decay"])
    share = _shares(rt, items, gamma)
    later = share[position + 1 :].sum(axis=0)
    return (gamma * (m - later) + share[position] + later).astype(np.float32)


def _no_history_left(memories: np.ndarray, known: int) -> list[np.ndarray | None]:
    """The memories per row, None where a variant keeps nothing of the user: its only known
    event dropped and a memory that is zero but for rounding (no older history). Such a user
    is one without events, as rebuild with no memory gives it, not one with an all-zero memory
    (which the memory's mix would still turn into a vector)."""
    rows: list[np.ndarray | None] = list(memories)
    if known == 1:
        scale = float(np.abs(memories[0]).max(initial=0.0))
        if float(np.abs(memories[1]).max(initial=0.0)) <= 1e-5 * max(scale, 1.0):
            rows[1] = None
    return rows


def _memories_without(
    rt: EncoderRuntime, items: np.ndarray, memory: np.ndarray, dropped: np.ndarray
) -> np.ndarray:
    """(1 + J, d): the persisted memory m, then the memory without each event j of ``dropped``.

    m is the older events' share (the memory before j, decayed n + 1 times, n the known events
    after j), plus j's share gamma^n e(item_j), plus the later events' share. Without j the
    older events decay one step less: m' = older / gamma + later. Only the window's shares are
    known, and they suffice: older = m - (j's share + later). The memory neither decays nor
    adds on an event the model does not know.
    """
    m = np.asarray(memory, np.float32).reshape(1, rt.d_model)
    config = rt.manifest["config"]
    if not config.get("use_memory", True):
        return np.repeat(m, 1 + len(dropped), axis=0)  # the model has no memory path
    gamma = float(config["memory_decay"])
    if gamma <= 0:
        raise ValueError("leave_one_out needs a memory decay > 0")
    share = _shares(rt, items, gamma)
    from_j = np.cumsum(share[::-1], axis=0)[::-1][dropped]  # (J, d): j's share + later
    later = from_j - share[dropped]
    without = (m.astype(np.float64) - from_j) / gamma + later
    return np.concatenate([m, without.astype(np.float32)])


def _shares(rt: EncoderRuntime, items: np.ndarray, gamma: float) -> np.ndarray:
    """(T, d) float64: each window event's share of the memory after the window's last event,
    gamma^n e(item) (n the known events after it); zero for an event the model does not know."""
    known = items > 0
    after = np.cumsum(known[::-1])[::-1] - known  # known events after each position
    emb = rt.item_embeddings[np.where(known, items, 0)].astype(np.float64)  # row 0 is zeros
    return np.power(gamma, after)[:, None] * emb * known[:, None]
