"""Item popularity as training saw it: the long-tail split and the popularity penalty.

Both the offline evaluation (encoder/evaluate.py, encoder/report.py) and the worker (through
the bundle's item counts, export/runtime.py) call these functions on the same counts, so a
penalty chosen from the report re-ranks the stream exactly as it re-ranked the report.

Numpy only: the worker imports this module and must not import torch.
"""

from __future__ import annotations

import math

import numpy as np

# The most popular fifth of the catalogue is the head; every other item is the long tail.
HEAD_SHARE = 0.2


def long_tail(counts: np.ndarray, head_share: float = HEAD_SHARE) -> np.ndarray:
    """(n_items + 1,) bool: True for long-tail items. ``counts`` is (n_items + 1,) training
    events per item with index 0 the padding, which is neither head nor tail.

    The head is the ceil(head_share * n_items) items with the most training events, ties
    to the lower index, so the split is the same wherever it is computed.
    """
    if not 0 <= head_share <= 1:
        raise ValueError(f"head_share must be within [0, 1], not {head_share}")
    counts = np.asarray(counts)
    n_items = len(counts) - 1
    order = np.lexsort((np.arange(n_items), -counts[1:])) + 1  # most popular first
    tail = np.ones(n_items + 1, dtype=bool)
    tail[0] = False
    tail[order[: math.ceil(head_share * n_items)]] = False
    return tail


def checked_penalty(penalty: float) -> float:
    """The penalty as a float; ValueError unless it is a finite number >= 0."""
    if not (isinstance(penalty, int | float) and penalty >= 0 and math.isfinite(penalty)):
        raise ValueError(f"the popularity penalty must be a number >= 0, not {penalty}")
    return float(penalty)


def popularity_bias(counts: np.ndarray, penalty: float) -> np.ndarray:
    """(n_items + 1,) float32 added to the model's item scores: -penalty * log(1 + count).

    The scores are logits of a softmax over items, so subtracting ``penalty`` times the log
    of an item's popularity divides its probability by popularity**penalty: 0 leaves the
    ranking as trained, 1 roughly cancels the popularity the model learnt, and values in
    between trade accuracy for reach (the report's curve shows how much).
    """
    log_counts = np.log1p(np.asarray(counts, dtype=np.float64))
    bias = (-checked_penalty(penalty) * log_counts).astype(np.float32)
    bias[0] = 0.0
    return bias


# The key of the training counts in a model directory's vocab.json (one per item, in the
# order of "items").
VOCAB_COUNTS_KEY = "item_counts"


def counts_from_vocab(vocab: object, n_items: int) -> np.ndarray | None:
    """(n_items + 1,) int64 training counts from a parsed vocab.json, padding at 0; None when
    the model directory holds none. Raises ValueError on a malformed list."""
    raw = vocab.get(VOCAB_COUNTS_KEY) if isinstance(vocab, dict) else None
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != n_items:
        got = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise ValueError(f"{VOCAB_COUNTS_KEY} has {got} entries, the model has {n_items} items")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in raw):
        raise ValueError(f"{VOCAB_COUNTS_KEY} holds something other than counts >= 0")
    return np.array([0, *raw], dtype=np.int64)
