"""Recommenders behind one interface: the worker hands over a micro-batch, gets top-K back.

`PopularityRecommender` is the baseline (popularity with recency, computed from the stream) and
the cold-start fallback of the encoder (`streams/encoder_recommender.py`). Both are plain,
synchronous and CPU-bound: the worker runs them in an executor thread, off the event loop.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from streams.events import Event
from streams.exposure import Exposure
from streams.window import WindowEntry

# What an item of the popularity baseline carries as its explanation: nothing of the user's
# drove it (INTEREST_EXPLAIN).
POPULAR = "popular"


class Request(msgspec.Struct, frozen=True):
    """Recommend for `event.user_id` right after `event`, given the window at that moment."""

    event: Event
    window: tuple[WindowEntry, ...]
    # False when the event was older than the window's newest one and was inserted in the
    # middle (clicks and purchases arrive on different topics), so it cannot simply be stepped.
    appended: bool = True


class StoredModelState(msgspec.Struct, frozen=True, gc=False):
    """What the store holds per user for the model, as read before the batch."""

    vector: bytes | None = None
    memory: bytes | None = None
    model_version: str | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    requests: Sequence[Request]
    # Per user: the window before this batch's events, and the persisted model state.
    prior_windows: Mapping[str, tuple[WindowEntry, ...]]
    stored: Mapping[str, StoredModelState]
    # Per user: the offsets JSON before and after this batch (cache validation: it changes
    # with every event applied to the user, whichever worker applied it).
    prior_signatures: Mapping[str, bytes]
    final_signatures: Mapping[str, bytes]
    popular: Sequence[tuple[str, float]]  # best first
    k: int
    # Users a forget request wiped in this batch: their requests (if any) start from nothing,
    # and no cached state of theirs may remain.
    forgotten: frozenset[str] = frozenset()


class Recommendation(msgspec.Struct, frozen=True):
    # Best first. Two lists rather than (item, score) pairs: the encoder's top-k comes as two
    # rows, and the worker needs the ids alone too (the user's last recommendation).
    item_ids: list[str]
    scores: list[float]
    model_version: str
    source: str  # "encoder" or "popularity" (cold start / baseline)
    # Per item, what drove it (INTEREST_EXPLAIN): the user's events with their weights
    # (streams/explain.py), or "popular" for an item of the popularity fallback.
    because: list[Any] | None = None

    @classmethod
    def of(
        cls, items: Sequence[tuple[str, float]], model_version: str, source: str
    ) -> Recommendation:
        return cls(
            [item for item, _ in items], [score for _, score in items], model_version, source
        )


class ModelUpdate(msgspec.Struct, frozen=True, gc=False):
    """The new model state of one user, written in the same atomic batch as its window."""

    vector: bytes
    memory: bytes
    model_version: str


@dataclass(slots=True)
class Result:
    recommendations: list[Recommendation]  # one per request, same order
    updates: dict[str, ModelUpdate] = field(default_factory=dict)
    # The recommended items as the model's indices, for the popularity-bias gauges
    # (streams/exposure.py); None from a recommender without a model.
    exposure: Exposure | None = None


class Recommender(Protocol):
    @property
    def model_version(self) -> str: ...

    def recommend(self, batch: Batch) -> Result: ...

    def drop_cache(self) -> None:
        """Forget every per-user state held in memory (after a rebalance)."""


def popular_unseen(
    popular: Sequence[tuple[str, float]], seen: set[str], k: int
) -> list[tuple[str, float]]:
    """The first k popular items not in `seen` (the popular list is short: stop early)."""
    out: list[tuple[str, float]] = []
    for item, score in popular:
        if item not in seen:
            out.append((item, score))
            if len(out) == k:
                break
    return out


class PopularityRecommender:
    """Most popular recent items the user has not interacted with in its window."""

    model_version = "popularity-v1"

    def __init__(self, explain: bool = False) -> None:
        # INTEREST_EXPLAIN: every item says it is popular, not driven by the user's events.
        self.explain = explain

    def drop_cache(self) -> None:
        """Nothing is cached per user."""

    def recommend(self, batch: Batch) -> Result:
        # Seen items grow per user event by event: the cost per event does not depend on the
        # window length. Items that left the window during this batch stay excluded until
        # the next batch.
        per_user: dict[str, set[str]] = {}
        recommendations = []
        for request in batch.requests:
            user_id = request.event.user_id
            seen = per_user.get(user_id)
            if seen is None:
                prior = batch.prior_windows.get(user_id, ())
                seen = per_user[user_id] = {entry.item_id for entry in prior}
            seen.add(request.event.item_id)
            items = popular_unseen(batch.popular, seen, batch.k)
            rec = Recommendation.of(items, self.model_version, "popularity")
            if self.explain:
                rec = msgspec.structs.replace(rec, because=[POPULAR] * len(items))
            recommendations.append(rec)
        return Result(recommendations)


def recommendation_id(trigger_event_id: str, model_version: str) -> str:
    """Deterministic, so a replayed batch republishes the same id and consumers can dedupe.

    A version-5-style UUID of sha256(model_version NUL trigger_event_id), formatted by hand:
    ``uuid.UUID`` costs the worker's event loop several times more per event; this is the same
    string (tests/streams/test_recommend.py compares it with ``recommendation_id_reference``).
    """
    digest = bytearray(hashlib.sha256(f"{model_version}\x00{trigger_event_id}".encode()).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def recommendation_id_reference(trigger_event_id: str, model_version: str) -> str:
    """The plain definition of ``recommendation_id``."""
    digest = hashlib.sha256(f"{model_version}\x00{trigger_event_id}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=5))


def recommendation_event(event: Event, recommendation: Recommendation) -> dict[str, Any]:
    """The published payload (the contract in README.md, "Events")."""
    return {
        "recommendation_id": recommendation_id(event.event_id, recommendation.model_version),
        "user_id": event.user_id,
        "items": _items(recommendation),
        "model_version": recommendation.model_version,
        "source": recommendation.source,
        "trigger_event_id": event.event_id,
        "event_timestamp": event.timestamp_ms,
        # When the event reached its input topic (its record's Kafka timestamp; null where the
        # broker gave none): generated_at minus this is its latency through the worker.
        "received_at": event.source.timestamp_ms,
        "generated_at": int(time.time() * 1000),
    }


def _items(recommendation: Recommendation) -> list[dict[str, Any]]:
    items = [
        {"item_id": item, "score": score}
        for item, score in zip(recommendation.item_ids, recommendation.scores, strict=True)
    ]
    if recommendation.because is not None:
        for item, because in zip(items, recommendation.because, strict=True):
            item["because"] = because
    return items
