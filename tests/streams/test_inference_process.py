"""The encoder in a child process against the same encoder in this process, batch by batch.

The child gets a slim form of each batch (windows only for users it does not hold) and must
give exactly what `EncoderRecommender` gives on the worker's full `Batch`: the same items, the
same scores and the same states, across appends, events out of time order, duplicates, windows
trimmed by length and age, LRU evictions, cold users, unknown items and users changed by
another worker in between.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the training extra (pip install -e .[train])")

from export.runtime import EncoderRuntime
from streams.encoder_recommender import EncoderRecommender
from streams.events import Event, Source
from streams.inference_process import (
    ChildState,
    InferenceProcessError,
    ProcessRecommender,
    slim_batch,
)
from streams.recommend import Batch, Request, Result, StoredModelState
from streams.store import encode_offsets
from streams.window import UserState, WindowPolicy, apply_event
from tests.streams.test_encoder_stream import ITEMS, make_bundle


class Stream:
    """Batches as `BatchProcessor` builds them, over random events of a few users."""

    def __init__(self, seed: int, policy: WindowPolicy) -> None:
        self.rng = random.Random(seed)
        self.policy = policy
        self.states: dict[str, UserState] = {}
        self.stored: dict[str, StoredModelState] = {}
        self.offset = 0
        self.clock = 1_000_000

    def event(self, user: str) -> Event:
        rng = self.rng
        self.offset += 1
        self.clock += rng.randint(1, 120_000)
        timestamp = self.clock - (rng.randint(1, 400_000) if rng.random() < 0.1 else 0)
        item = rng.choice(ITEMS) if rng.random() < 0.9 else f"unknown-{rng.randint(0, 3)}"
        event_id = f"e{self.offset}" if rng.random() < 0.95 else f"e{max(1, self.offset - 1)}"
        kind = rng.choice(["click", "purchase", "view"])
        return Event(event_id, user, item, kind, timestamp, Source("clicks", 0, self.offset))

    def elsewhere(self, user: str) -> None:
        """Another worker applies an event to this user (neither recommender sees it)."""
        apply_event(self.states.setdefault(user, UserState()), self.event(user), self.policy)

    def batch(self, users: list[str], size: int) -> Batch:
        events = [self.event(self.rng.choice(users)) for _ in range(size)]
        touched = {e.user_id for e in events}
        for user in touched:
            self.states.setdefault(user, UserState())
        prior_windows = {u: tuple(self.states[u].window) for u in touched}
        prior_signatures = {u: encode_offsets(self.states[u].offsets) for u in touched}
        requests = []
        for event in events:
            state = self.states[event.user_id]
            if apply_event(state, event, self.policy):
                appended = state.window[-1].event_id == event.event_id
                requests.append(Request(event, tuple(state.window), appended))
        return Batch(
            requests=requests,
            prior_windows=prior_windows,
            stored={u: self.stored.get(u, StoredModelState()) for u in touched},
            prior_signatures=prior_signatures,
            final_signatures={u: encode_offsets(self.states[u].offsets) for u in touched},
            popular=[(ITEMS[i], float(30 - i)) for i in range(20)],
            k=5,
        )

    def written(self, result: Result) -> None:
        for user, update in result.updates.items():
            self.stored[user] = StoredModelState(None, update.memory, update.model_version)


def assert_same(got: Result, want: Result) -> None:
    assert len(got.recommendations) == len(want.recommendations)
    for a, b in zip(got.recommendations, want.recommendations, strict=True):
        assert (a.item_ids, a.model_version, a.source) == (b.item_ids, b.model_version, b.source)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    assert got.updates.keys() == want.updates.keys()
    for user, update in want.updates.items():
        other = got.updates[user]
        assert other.model_version == update.model_version
        np.testing.assert_allclose(
            np.frombuffer(other.vector, np.float32),
            np.frombuffer(update.vector, np.float32),
            atol=1e-5,
        )
        np.testing.assert_allclose(
            np.frombuffer(other.memory, np.float32),
            np.frombuffer(update.memory, np.float32),
            atol=1e-5,
        )


@pytest.mark.parametrize("cache_users", [3, 50])
def test_the_slim_batch_gives_what_the_full_batch_gives(tmp_path: Path, cache_users: int) -> None:
    """In one process (the wire format and the child's windows, without the pipe)."""
    _, bundle = make_bundle(tmp_path, seed=5)
    reference = EncoderRecommender(EncoderRuntime.load(bundle, device="cpu"), cache_users)
    child = ChildState(EncoderRecommender(EncoderRuntime.load(bundle, device="cpu"), cache_users))
    held: OrderedDict[str, bytes] = OrderedDict()
    stream = Stream(seed=cache_users, policy=WindowPolicy(length=12, max_age_ms=3_000_000))
    users = [f"u{i}" for i in range(8)]
    windows_sent = 0
    for step in range(40):
        if step % 7 == 3:
            stream.elsewhere(stream.rng.choice(users))
        batch = stream.batch(users, size=stream.rng.randint(1, 25))
        message = slim_batch(batch, held, cache_users)
        windows_sent += sum(user.prior_window is not None for user in message.users)
        got = child.run(message)
        want = reference.recommend(batch)
        assert_same(Result(got.recommendations, got.updates), want)
        stream.written(want)
        assert set(child.windows) == set(held)  # both sides agree on what the child holds
    # Held windows are not sent again: far fewer windows crossed than users were in batches.
    assert 0 < windows_sent < 40 * len(users) / (2 if cache_users > len(users) else 1)


def test_the_child_process_gives_what_the_encoder_gives(tmp_path: Path) -> None:
    _, bundle = make_bundle(tmp_path, seed=6)
    reference = EncoderRecommender(EncoderRuntime.load(bundle, device="cpu"), 4)
    recommender = ProcessRecommender(bundle, cache_users=4, device="cpu")
    try:
        assert recommender.model_version == reference.model_version
        stream = Stream(seed=1, policy=WindowPolicy(length=10))
        users = [f"u{i}" for i in range(6)]
        for _ in range(15):
            batch = stream.batch(users, size=stream.rng.randint(1, 20))
            want = reference.recommend(batch)
            assert_same(recommender.recommend(batch), want)
            stream.written(want)
    finally:
        recommender.close()
    assert not recommender._process.is_alive()


def test_a_bad_bundle_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InferenceProcessError, match="cannot load"):
        ProcessRecommender(tmp_path / "no-such-bundle", device="cpu")


def test_a_dead_child_fails_the_batch_and_every_later_one(tmp_path: Path) -> None:
    """The worker then exits unacked and replays; no batch may run on a half-known cache."""
    _, bundle = make_bundle(tmp_path, seed=7)
    recommender = ProcessRecommender(bundle, cache_users=4, device="cpu")
    stream = Stream(seed=2, policy=WindowPolicy(length=10))
    batch = stream.batch(["u1", "u2"], size=5)
    recommender.recommend(batch)
    recommender._process.kill()
    recommender._process.join()
    with pytest.raises(InferenceProcessError, match="gone"):
        recommender.recommend(stream.batch(["u1", "u2"], size=5))
    with pytest.raises(InferenceProcessError, match="earlier batch"):
        recommender.recommend(stream.batch(["u1", "u2"], size=5))
    recommender.close()
