"""Recommenders behind one interface: the worker asks for top-K per (user, window) request.

`PopularityRecommender` is the baseline (popularity with recency, computed from the stream) and
the cold-start fallback for the encoder.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from streams.events import Event
from streams.window import WindowEntry


@dataclass(frozen=True, slots=True)
class Request:
    """Recommend for `event.user_id` right after `event`, given the window at that moment."""

    event: Event
    window: Sequence[WindowEntry]


@dataclass(frozen=True, slots=True)
class Recommendation:
    items: list[tuple[str, float]]
    model_version: str
    source: str  # "popularity" or "encoder"


class Recommender(Protocol):
    def recommend(
        self, requests: Sequence[Request], popular: Sequence[tuple[str, float]], k: int
    ) -> list[Recommendation]: ...


class PopularityRecommender:
    """Most popular recent items the user has not interacted with in its window."""

    model_version = "popularity-v1"

    def recommend(
        self, requests: Sequence[Request], popular: Sequence[tuple[str, float]], k: int
    ) -> list[Recommendation]:
        results = []
        for request in requests:
            seen = {entry.item_id for entry in request.window}
            items = [(item, score) for item, score in popular if item not in seen][:k]
            results.append(Recommendation(items, self.model_version, "popularity"))
        return results


def recommendation_id(trigger_event_id: str, model_version: str) -> str:
    """Deterministic, so a replayed batch republishes the same id and consumers can dedupe."""
    digest = hashlib.sha256(f"{model_version}\x00{trigger_event_id}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


def recommendation_event(event: Event, recommendation: Recommendation) -> dict[str, Any]:
    """The published payload (contract in DESIGN.md; `source` is an extension)."""
    return {
        "recommendation_id": recommendation_id(event.event_id, recommendation.model_version),
        "user_id": event.user_id,
        "items": [{"item_id": item, "score": score} for item, score in recommendation.items],
        "model_version": recommendation.model_version,
        "source": recommendation.source,
        "trigger_event_id": event.event_id,
        "event_timestamp": event.timestamp_ms,
        "generated_at": int(time.time() * 1000),
    }
