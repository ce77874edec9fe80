"""The step's attention, reading each user's caches where they lie in a slab of users' states.

step.onnx needs its batch's caches in one array: the worker would gather each user's caches
out of its slab of cached users every batch, have the graph read them, and write the new
slots back, three passes over memory for one read's worth of arithmetic. This kernel does the
one read, in place, row by row; the dense parts stay in ONNX (export/graphs.py's StepStage).

Layout (export/bundle_format.py): a cache is (N, H, span-1, w) with w = head_dim + 1; keys
carry the empty-slot mask in their last column and the query a constant 1 there, so
``q . key`` is already masked; values carry a constant 1, so the output's last column is the
sum of the weights. Slot ``s`` of a user whose oldest slot is ``ring`` holds the event
``span-1 - (s - ring) % (span-1)`` steps back.

Numba, not numpy: numpy can only read rows scattered over the slab by copying them. The
loops run without the GIL, so the worker's event loop keeps its core meanwhile. Plain
reference: ``attend_reference`` below, compared over random shapes and slot positions in
tests/export/test_slab_attention.py; the whole staged step is compared with step.onnx in
tests/export/test_parity.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, fastmath=True, boundscheck=False)
def attend_in_place(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    rows: np.ndarray,
    ring: np.ndarray,
    bias_by_age: np.ndarray,
    out: np.ndarray,
) -> None:
    """Attention of each event over its user's cached events and itself, then the event's key
    and value written into the user's oldest slot (``ring[rows[b]]``).

    query, key, value, out: (B, H, w) float32, row b is the event of slab row ``rows[b]``;
    keys, values: (N, H, span-1, w) float32 slab caches; ring: (N,) int64;
    bias_by_age: (span, H) float32, the bias of an event k steps back (k = 0: itself).
    ``rows`` must not repeat (each row's new slot overwrites what the next event would read).
    """
    batch, heads, width = query.shape
    slots = keys.shape[2]
    scores = np.empty(slots + 1, np.float32)
    acc = np.empty(width, np.float32)
    for b in range(batch):
        row = rows[b]
        oldest = ring[row]
        for h in range(heads):
            q = query[b, h]
            best = np.float32(-np.inf)
            for s in range(slots):
                cached = keys[row, h, s]
                score = np.float32(0.0)
                for j in range(width):
                    score += q[j] * cached[j]
                score += bias_by_age[slots - (s - oldest) % slots, h]
                scores[s] = score
                best = max(best, score)
            score = np.float32(0.0)
            for j in range(width):
                score += q[j] * key[b, h, j]
            score += bias_by_age[0, h]
            scores[slots] = score
            best = max(best, score)
            total = np.float32(0.0)
            for s in range(slots + 1):
                scores[s] = np.exp(scores[s] - best)
                total += scores[s]
            for j in range(width):
                acc[j] = scores[slots] * value[b, h, j]
            for s in range(slots):
                weight = scores[s]
                cached = values[row, h, s]
                for j in range(width):
                    acc[j] += weight * cached[j]
            for j in range(width):
                out[b, h, j] = acc[j] / total
                keys[row, h, oldest, j] = key[b, h, j]
                values[row, h, oldest, j] = value[b, h, j]


def attend_reference(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    rows: np.ndarray,
    ring: np.ndarray,
    bias_by_age: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plain reference for ``attend_in_place``, same arguments but ``out``: returns (out,
    keys after, values after) and changes nothing it is given.

    Per event: the user's cached events put in age order, softmax of ``q . key + bias`` over
    them and the event itself (float64), the weighted sum of the values; then the event's key
    and value replace the oldest cached event.
    """
    slots = keys.shape[2]
    keys_after, values_after = keys.copy(), values.copy()
    out = np.empty_like(query)
    for b, row in enumerate(rows):
        oldest = int(ring[row])
        order = [(oldest + i) % slots for i in range(slots)]  # oldest cached event first
        cached_keys = keys[row][:, order].astype(np.float64)  # (H, slots, w)
        cached_values = values[row][:, order].astype(np.float64)
        all_keys = np.concatenate([cached_keys, key[b][:, None].astype(np.float64)], axis=1)
        all_values = np.concatenate([cached_values, value[b][:, None].astype(np.float64)], axis=1)
        ages = np.arange(slots, -1, -1)  # the oldest is span-1 back, the event itself 0
        scores = np.einsum("hw,hsw->hs", query[b].astype(np.float64), all_keys)
        scores += bias_by_age[ages].T  # (H, slots + 1)
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        out[b] = np.einsum("hs,hsw->hw", weights, all_values)
        keys_after[row, :, oldest] = key[b]
        values_after[row, :, oldest] = value[b]
    return out, keys_after, values_after
