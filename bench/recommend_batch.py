"""EncoderRecommender.recommend on one 500-user batch of the ml-1m bundle, all users cached and
all but one cached (a new user in every batch, as in production), median ms of 15 batches.

    python bench/recommend_batch.py REPO_ROOT BUNDLE [HISTORY]

HISTORY: events per user before the timed batches (default 3; 200 fills the default window).

REPO_ROOT: the tree whose streams/ and export/ are imported (run it against two checkouts,
alternately, to compare a change side by side; a tree of another bundle format needs the model
exported by that tree). No Kafka or Redis.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, sys.argv[1])

from export.runtime import EncoderRuntime
from streams.encoder_recommender import EncoderRecommender
from streams.events import Event, Source
from streams.recommend import Batch, Request
from streams.window import WindowEntry

USERS = 500


def main() -> None:
    rt = EncoderRuntime.load(Path(sys.argv[2]))
    recommender = EncoderRecommender(rt, cache_users=10_000)
    rng = np.random.default_rng(0)
    items = [i for i in rt.item_ids if i]
    windows: dict[str, list[WindowEntry]] = {f"u{i}": [] for i in range(4 * USERS)}
    clock = 1_700_000_000_000

    def batch(users: list[str]) -> Batch:
        nonlocal clock
        prior = {u: tuple(windows[u]) for u in users}
        requests = []
        for u in users:
            clock += 1000
            item = items[int(rng.integers(len(items)))]
            event = Event(f"e{clock}", u, item, "click", clock, Source("t", 0, clock))
            windows[u] = [*windows[u], WindowEntry.from_event(event)][-200:]
            requests.append(Request(event, tuple(windows[u])))
        return Batch(
            requests,
            prior,
            {},
            {u: f"{u}:{len(prior[u])}" for u in users},
            {u: f"{u}:{len(windows[u])}" for u in users},
            [],
            10,
        )

    users = [f"u{i}" for i in range(USERS)]
    history = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    for _ in range(history):  # warm: every user cached
        recommender.recommend(batch(users))
    fresh = iter(range(USERS, 4 * USERS))
    for label, one_new in (("all cached", False), ("all but one cached", True)):
        times = []
        for _ in range(15):
            if one_new:
                users = [*users[1:], f"u{next(fresh)}"]
            b = batch(users)
            started = time.perf_counter()
            recommender.recommend(b)
            times.append(time.perf_counter() - started)
        print(f"{sys.argv[1]}: {label}: median {1000 * np.median(times):.1f} ms")


if __name__ == "__main__":
    main()
