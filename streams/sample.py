"""A deterministic synthetic event stream for the demo and tests (no licensed data needed).

Users have a favourite "genre" of items and mostly click within it, with Zipf-like popularity,
so recommendations have something to find.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def sample_events(
    users: int = 50, events_per_user: int = 20, items: int = 200, genres: int = 5, seed: int = 7
) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(items // genres)]
    favourite = {u: rng.randrange(genres) for u in range(users)}
    clock = {u: EPOCH_MS + rng.randrange(3_600_000) for u in range(users)}
    for step in range(events_per_user):
        for user in range(users):
            genre = favourite[user] if rng.random() < 0.8 else rng.randrange(genres)
            rank = rng.choices(range(len(weights)), weights=weights)[0]
            item = genre * (items // genres) + rank
            clock[user] += rng.randrange(1_000, 600_000)
            roll = rng.random()
            kind = "purchase" if roll < 0.05 else "add_to_cart" if roll < 0.1 else "click"
            yield {
                "event_id": f"sample-{user}-{step}",
                "user_id": f"user-{user}",
                "item_id": f"item-{item}",
                "event_type": kind,
                "timestamp": clock[user],
            }
