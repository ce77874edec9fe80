"""EncoderRecommender on one batch, against plain references: what it excludes and what it ranks.

No broker or Redis: the recommender is pure computation over a batch (the stream tests in
test_encoder_stream.py cover it in the worker).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the training extra (pip install -e .[train])")

from export.runtime import EncoderRuntime, top_k_reference
from streams.encoder_recommender import EncoderRecommender
from streams.events import Event, Source
from streams.recommend import Batch, Request, Result
from streams.window import WindowEntry
from tests.streams.test_encoder_stream import ITEMS, make_bundle


def assert_same_vectors(got: Result, want: Result, users: Iterable[str], atol: float) -> None:
    for user in users:
        np.testing.assert_allclose(
            np.frombuffer(got.updates[user].vector, np.float32),
            np.frombuffer(want.updates[user].vector, np.float32),
            atol=atol,
        )


def test_each_event_excludes_the_window_and_the_batch_so_far(tmp_path: Path) -> None:
    _, bundle = make_bundle(tmp_path, seed=3)
    rt = EncoderRuntime.load(bundle, device="cpu")
    recommender = EncoderRecommender(rt, cache_users=100)
    k = 10
    priors = {
        "u1": [WindowEntry(f"p{i}", ITEMS[i], "click", 1_000 + i) for i in range(6)],
        "u2": [WindowEntry("q0", "unknown-item", "click", 1_000)],  # nothing the model knows
        "u3": [],
    }
    events = [
        ("u1", ITEMS[10]),
        ("u2", ITEMS[11]),
        ("u1", ITEMS[12]),
        ("u3", "another-unknown"),
        ("u1", ITEMS[2]),  # already in the window: seen twice, excluded once
        ("u2", ITEMS[13]),
    ]
    windows = {user: list(window) for user, window in priors.items()}
    requests = []
    for offset, (user, item) in enumerate(events):
        event = Event(f"e{offset}", user, item, "click", 2_000 + offset, Source("t", 0, offset))
        windows[user].append(WindowEntry.from_event(event))
        requests.append(Request(event, tuple(windows[user])))
    batch = Batch(
        requests=requests,
        prior_windows={user: tuple(window) for user, window in priors.items()},
        stored={},
        prior_signatures={user: b"" for user in priors},
        final_signatures={user: b"after" for user in priors},
        popular=[(ITEMS[i], float(100 - i)) for i in range(20)],
        k=k,
    )
    result = recommender.recommend(batch)

    for index, (request, rec) in enumerate(zip(requests, result.recommendations, strict=True)):
        user = request.event.user_id
        seen = {e.item_id for e in priors[user]} | {
            item for u, item in events[: index + 1] if u == user
        }
        assert not seen & set(rec.item_ids), (index, rec.item_ids)
        assert len(rec.item_ids) == len(rec.scores) == k
    # u3 knows nothing the model knows: the popularity fallback, marked as such.
    sources = [rec.source for rec in result.recommendations]
    assert sources == ["encoder", "encoder", "encoder", "popularity", "encoder", "encoder"]

    # Each user's last recommendation is the plain top-k of its final vector.
    last = {request.event.user_id: i for i, request in enumerate(requests)}
    for user in ("u1", "u2"):
        vector = np.frombuffer(result.updates[user].vector, np.float32)[None]
        seen_idx = rt.index_of([e.item_id for e in windows[user]])
        ref_i, ref_s = top_k_reference(rt.scores(vector), k, [seen_idx])
        rec = result.recommendations[last[user]]
        assert rec.item_ids == rt.ids_of(ref_i[0])
        np.testing.assert_allclose(rec.scores, ref_s[0], rtol=1e-5, atol=1e-5)


def test_cached_states_continue_like_states_rebuilt_from_the_window(tmp_path: Path) -> None:
    """The state cache's in-place path (ring-buffer slots written back, window items kept
    mapped, rows evicted and reused, users with several events in a batch, items the model does
    not know) gives the vectors and recommendations of a recommender that rebuilds every user
    from its whole window each batch (the reference, no cache)."""
    _, bundle = make_bundle(tmp_path, seed=5)
    rt = EncoderRuntime.load(bundle, device="cpu")
    cached = EncoderRecommender(rt, cache_users=5)  # fewer rows than users: evictions
    reference = EncoderRecommender(rt, cache_users=0)
    rng = np.random.default_rng(0)
    users = [f"u{i}" for i in range(8)]
    windows: dict[str, list[WindowEntry]] = {user: [] for user in users}
    clock = 1_000
    for _ in range(30):  # ~10 events per user: the 4-slot rings wrap around
        picked = rng.choice(users, size=int(rng.integers(1, 7)), replace=False)
        prior = {user: tuple(windows[user]) for user in picked}
        requests = []
        for user in picked:
            for _ in range(int(rng.integers(1, 4))):
                clock += 1
                unknown = rng.random() < 0.15  # an item the model never saw: no step
                item = f"new-{clock}" if unknown else ITEMS[int(rng.integers(0, len(ITEMS)))]
                event = Event(f"e{clock}", user, item, "click", clock, Source("t", 0, clock))
                windows[user].append(WindowEntry.from_event(event))
                requests.append(Request(event, tuple(windows[user])))
        batch = Batch(
            requests=requests,
            prior_windows=prior,
            stored={},
            prior_signatures={user: f"{user}:{len(prior[user])}".encode() for user in picked},
            final_signatures={user: f"{user}:{len(windows[user])}".encode() for user in picked},
            popular=[],
            k=3,
        )
        got, want = cached.recommend(batch), reference.recommend(batch)
        # the same seen items excluded (the cached path keeps them mapped, the reference maps
        # each window afresh), so the same items recommended
        assert [r.item_ids for r in got.recommendations] == [
            r.item_ids for r in want.recommendations
        ]
        assert_same_vectors(got, want, picked, atol=1e-4)
    assert len(cached.cache) == 5


def test_an_item_the_model_does_not_know_leaves_the_state_as_it_was(tmp_path: Path) -> None:
    _, bundle = make_bundle(tmp_path, seed=7)
    recommender = EncoderRecommender(EncoderRuntime.load(bundle, device="cpu"), cache_users=10)
    window: list[WindowEntry] = []
    for offset in range(3):
        before = recommender.recommend(one_event_batch(window, ITEMS[offset], offset, 3))
    after = recommender.recommend(one_event_batch(window, "never-seen-item", 3, 3))
    before, after = before.updates["u"], after.updates["u"]
    assert after.vector == before.vector
    assert after.memory == before.memory


def test_the_cached_window_items_follow_the_trimmed_window(tmp_path: Path) -> None:
    """What the cache keeps as a user's seen items is its window's, after the window dropped
    its oldest events, and after an event inserted out of time order."""
    _, bundle = make_bundle(tmp_path, seed=8)
    rt = EncoderRuntime.load(bundle, device="cpu")
    recommender = EncoderRecommender(rt, cache_users=10)
    window: list[WindowEntry] = []

    def run(items_and_times: list[tuple[str, int]], keep: int) -> None:
        prior = tuple(window)
        requests = []
        for item, ts in items_and_times:
            event = Event(f"e{ts}", "u", item, "click", ts, Source("t", 0, ts))
            entry = WindowEntry.from_event(event)
            appended = not window or window[-1].timestamp_ms <= ts
            window.append(entry)
            window.sort(key=lambda e: e.timestamp_ms)
            del window[:-keep]
            requests.append(Request(event, tuple(window), appended))
        recommender.recommend(
            Batch(
                requests=requests,
                prior_windows={"u": prior},
                stored={},
                prior_signatures={"u": str(len(prior) and prior[-1].timestamp_ms).encode()},
                final_signatures={"u": str(window[-1].timestamp_ms).encode()},
                popular=[],
                k=3,
            )
        )
        expected = rt.index_of([entry.item_id for entry in window])
        assert recommender.cache.window_items("u").tolist() == expected.tolist()

    run([(ITEMS[i], 1_000 + i) for i in range(5)], keep=3)  # 5 events into a 3-event window
    run([(ITEMS[7], 2_000), ("not-a-known-item", 2_001)], keep=3)  # a hit: prior + new, trimmed
    run([(ITEMS[9], 1_500)], keep=3)  # older than the newest: inserted


def test_a_batch_that_fails_half_way_leaves_no_stale_cached_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The steps write the cached states in place: when a batch fails after some of them, its
    users must come back rebuilt from their windows, not from half-stepped states."""
    _, bundle = make_bundle(tmp_path, seed=9)
    rt = EncoderRuntime.load(bundle, device="cpu")
    cached = EncoderRecommender(rt, cache_users=10)
    reference = EncoderRecommender(rt, cache_users=0)
    windows: dict[str, list[WindowEntry]] = {"u1": [], "u2": []}

    def batch_of(offset: int) -> Batch:
        prior = {user: tuple(window) for user, window in windows.items()}
        requests = []
        for n, user in enumerate(windows):
            ts = 1_000 + 10 * offset + n
            item = ITEMS[(3 * offset + n) % len(ITEMS)]
            event = Event(f"e{ts}", user, item, "click", ts, Source("t", 0, ts))
            windows[user].append(WindowEntry.from_event(event))
            requests.append(Request(event, tuple(windows[user])))
        return Batch(
            requests=requests,
            prior_windows=prior,
            stored={},
            prior_signatures={user: str(len(w)).encode() for user, w in prior.items()},
            final_signatures={user: str(len(w)).encode() for user, w in windows.items()},
            popular=[],
            k=3,
        )

    for offset in range(3):
        first = batch_of(offset)
        cached.recommend(first)
        reference.recommend(first)
    failing = batch_of(3)
    step_rows = rt.step_rows

    def step_then_fail(*args: object) -> None:
        step_rows(*args)  # the slab rows are written ...
        raise RuntimeError("inference failed")  # ... and the batch fails

    monkeypatch.setattr(rt, "step_rows", step_then_fail)
    with pytest.raises(RuntimeError, match="inference failed"):
        cached.recommend(failing)
    monkeypatch.setattr(rt, "step_rows", step_rows)
    got, want = cached.recommend(failing), reference.recommend(failing)  # the batch retried
    assert_same_vectors(got, want, windows, atol=1e-5)
    assert len(cached.cache) == 2


def test_explanations_follow_each_event_of_a_user_within_one_batch(tmp_path: Path) -> None:
    """INTEREST_EXPLAIN: a user with several events in a batch (more requests than cached
    users) gets, for each, the weights of the window and memory right after that event."""
    from streams.explain import ModelInputs, explain_window
    from streams.recommend import POPULAR

    _, bundle = make_bundle(tmp_path, seed=3)
    rt = EncoderRuntime.load(bundle, device="cpu")
    recommender = EncoderRecommender(rt, cache_users=1, explain_events=2)
    window: list[WindowEntry] = []
    requests = []
    for offset, item in enumerate([ITEMS[4], ITEMS[9], "unknown-item", ITEMS[1]]):
        event = Event(
            f"e{offset}", "u1", item, "click", 2_000 + 60_000 * offset, Source("t", 0, offset)
        )
        window.append(WindowEntry.from_event(event))
        requests.append(Request(event, tuple(window)))
    cold = Event("c0", "u2", "never-seen", "click", 5_000, Source("t", 0, 9))
    requests.append(Request(cold, (WindowEntry.from_event(cold),)))
    batch = Batch(
        requests=requests,
        prior_windows={"u1": (), "u2": ()},
        stored={},
        prior_signatures={"u1": b"", "u2": b""},
        final_signatures={"u1": b"a", "u2": b"b"},
        popular=[(ITEMS[i], float(100 - i)) for i in range(20)],
        k=3,
    )
    recs = recommender.recommend(batch).recommendations
    assert recs[-1].source == "popularity" and recs[-1].because == [POPULAR] * len(
        recs[-1].item_ids
    )
    # Each u1 event against its own window, rebuilt from scratch (the window is the history).
    for request, rec in zip(requests[:-1], recs[:-1], strict=True):
        targets = rt.index_of(rec.item_ids)
        _, because = explain_window(rt, ModelInputs.of(rt), request.window, None, targets, 2)
        assert [[b["event_id"] for b in row] for row in rec.because] == [
            [b["event_id"] for b in row] for row in because
        ]
        for got, want in zip(rec.because, because, strict=True):
            np.testing.assert_allclose(
                [b["weight"] for b in got], [b["weight"] for b in want], atol=1e-4
            )


def test_an_event_inserted_out_of_time_order_gives_the_exact_vector_and_explanation(
    tmp_path: Path,
) -> None:
    """Its share joins the memory where it belongs in time (export.explain.memory_with): the
    user is as if the events had come in order, rebuilt from scratch."""
    from streams.explain import ModelInputs, explain_window

    _, bundle = make_bundle(tmp_path, seed=4)
    rt = EncoderRuntime.load(bundle, device="cpu")
    recommender = EncoderRecommender(rt, cache_users=10, explain_events=3)
    timed = [(ITEMS[3], 1_000), (ITEMS[8], 181_000), (ITEMS[6], 61_000)]  # the last one is late
    window: list[WindowEntry] = []
    requests = []
    for offset, (item, at) in enumerate(timed):
        event = Event(f"e{offset}", "u1", item, "click", at, Source("t", 0, offset))
        window = sorted([*window, WindowEntry.from_event(event)], key=lambda e: e.timestamp_ms)
        requests.append(Request(event, tuple(window), appended=offset < 2))
    batch = Batch(
        requests=requests,
        prior_windows={"u1": ()},
        stored={},
        prior_signatures={"u1": b""},
        final_signatures={"u1": b"a"},
        popular=[],
        k=5,
    )
    result = recommender.recommend(batch)
    inputs = ModelInputs.of(rt)
    items, types, gaps = recommender._features(window)
    vector, _ = rt.rebuild([items], [types], [gaps], memory=None)
    stored = np.frombuffer(result.updates["u1"].vector, np.float32)
    np.testing.assert_allclose(stored, vector[0], atol=1e-5)
    last = result.recommendations[-1]
    _, because = explain_window(rt, inputs, window, None, rt.index_of(last.item_ids), 3)
    assert last.because is not None
    for got, want in zip(last.because, because, strict=True):
        assert [b["event_id"] for b in got] == [b["event_id"] for b in want]
        np.testing.assert_allclose(
            [b["weight"] for b in got], [b["weight"] for b in want], atol=1e-4
        )


def one_event_batch(window: list[WindowEntry], item: str, offset: int, k: int) -> Batch:
    """User "u"'s next event on ``item`` as a one-request batch; ``window`` grows with it."""
    prior = tuple(window)
    event = Event(f"e{offset}", "u", item, "click", 1_000 + offset, Source("t", 0, offset))
    window.append(WindowEntry.from_event(event))
    return Batch(
        requests=[Request(event, tuple(window))],
        prior_windows={"u": prior},
        stored={},
        prior_signatures={"u": str(len(prior)).encode()},
        final_signatures={"u": str(len(window)).encode()},
        popular=[],
        k=k,
    )
