"""Explanations of recommendations: the events of the user's window that drove each item.

The weights are the model's own (export/explain.py: how much the item's score drops when the
event is taken out of the user's history, attention and long-term memory alike). Used three
ways: recommendation events carry them when `INTEREST_EXPLAIN` is on (the encoder recommender
calls `explain_window`), and `interest explain` and `GET /users/{id}/explanations` answer for a
user from the state in Redis (`explain_user`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import UserError
from encoder.features import DEFAULT_EVENT_TYPE, EVENT_TYPES
from export.explain import leave_one_out, top_events, window_gaps
from export.runtime import UNKNOWN, EncoderRuntime
from streams.store import StoredUser
from streams.window import WindowEntry


@dataclass(frozen=True, slots=True)
class ModelInputs:
    """How a bundle reads a window: which event features it was trained with."""

    type_index: Mapping[str, int]
    use_gaps: bool

    @classmethod
    def of(cls, runtime: EncoderRuntime) -> ModelInputs:
        config = runtime.manifest.get("config", {})
        # A model trained without types/timestamps saw only the defaults: feed it the same.
        use_types = bool(config.get("uses_event_types", True))
        known = runtime.event_types
        # Every type the worker accepts; one the model was exported without reads as the
        # default type, the one it saw for data without types.
        return cls(
            {
                name: known.index(name) if use_types and name in known else DEFAULT_EVENT_TYPE
                for name in EVENT_TYPES
            },
            bool(config.get("uses_time_gaps", True)),
        )


def explain_window(
    runtime: EncoderRuntime,
    inputs: ModelInputs,
    window: Sequence[WindowEntry],
    memory: np.ndarray | None,
    targets: np.ndarray,
    top: int,
) -> tuple[np.ndarray, list[list[dict[str, Any]]]]:
    """Scores of ``targets`` (model indices) and, per target, its ``top`` events
    (``{"event_id", "item_id", "weight"}``, biggest weight first)."""
    items, types, stamps = features(runtime, inputs, window)
    scores, weights = leave_one_out(
        runtime, items, types, stamps, memory, targets, use_gaps=inputs.use_gaps
    )
    because = [
        [
            {
                "event_id": window[j].event_id,
                "item_id": window[j].item_id,
                "weight": round(weight, 6),
            }
            for j, weight in top_events(row, top)
        ]
        for row in weights
    ]
    return scores, because


def features(
    runtime: EncoderRuntime, inputs: ModelInputs, window: Sequence[WindowEntry]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(items as model indices, event type indices, timestamps) of a window, oldest first."""
    items = runtime.index_of([entry.item_id for entry in window])
    types = np.fromiter((inputs.type_index[e.event_type] for e in window), np.int64, len(window))
    stamps = np.fromiter((e.timestamp_ms for e in window), np.int64, len(window))
    return items, types, stamps


def stored_memory(runtime: EncoderRuntime, user: StoredUser) -> np.ndarray | None:
    """The user's persisted memory, if this model wrote it (another model's means nothing)."""
    if user.memory is None or user.model_version != runtime.version:
        return None
    return np.frombuffer(user.memory, np.float32)


def explain_user(
    runtime: EncoderRuntime,
    user_id: str,
    user: StoredUser | None,
    item_id: str | None,
    k: int,
    top: int,
) -> dict[str, Any]:
    """A user's explanations from its stored state: for ``item_id``, or for the ``k`` items
    the model ranks first now (the user's window excluded). UserError for an unknown user or
    item, or a user with no event the model knows."""
    if user is None or not user.state.window:
        raise UserError(f"unknown user {user_id!r}: no events of theirs are stored")
    window = user.state.window
    memory = stored_memory(runtime, user)
    inputs = ModelInputs.of(runtime)
    seen, types, stamps = features(runtime, inputs, window)
    if item_id is not None:
        (target,) = runtime.index_of([item_id])
        if target == UNKNOWN:
            raise UserError(
                f"unknown item {item_id!r}: the model {runtime.version} has no such item"
            )
        targets = np.array([target], np.int64)
    else:
        if not (seen > 0).any() and memory is None:
            raise UserError(f"the model knows none of user {user_id!r}'s items")
        gaps = window_gaps(stamps, runtime.n_time_buckets, inputs.use_gaps)
        vector, _ = runtime.rebuild([seen], [types], [gaps], [memory])
        top_items, _ = runtime.top_k(vector, k, exclude=[seen[seen > 0]])
        targets = top_items[0][top_items[0] > 0]
    scores, because = explain_window(runtime, inputs, window, memory, targets, top)
    names = runtime.ids_of(targets)
    return {
        "user_id": user_id,
        "model_version": runtime.version,
        "items": [
            {"item_id": name, "score": round(float(score), 6), "because": reasons}
            for name, score, reasons in zip(names, scores.tolist(), because, strict=True)
        ],
    }
