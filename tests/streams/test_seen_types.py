"""The seen-items rule by event type (INTEREST_EXCLUDE_SEEN_TYPES) in the worker's exclusion
matrix, against a plain reference and against offline evaluation on the same log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from encoder.features import EVENT_TYPES, excluded_type_indices
from streams.events import Event, Source
from streams.recommend import Request
from streams.seen_items import request_ranks, seen_matrix, typed_exclusion
from streams.window import WindowEntry

TYPES = ("view", "purchase", "add_to_cart")
ITEMS = [f"i{n}" for n in range(1, 10)]


def index_of(names: list[str]) -> np.ndarray:
    """Model indices as the runtime gives them: 1.. for known items, -1 for the others."""
    return np.array([ITEMS.index(n) + 1 if n in ITEMS else -1 for n in names], np.int64)


def batch_of(
    priors: dict[str, list[WindowEntry]], events: list[tuple[str, str, str]]
) -> tuple[list[Request], dict[str, list[int]], list[str]]:
    """Requests for (user, item, type) events after the users' prior windows."""
    windows = {user: list(window) for user, window in priors.items()}
    requests, per_user = [], {}
    for n, (user, item, kind) in enumerate(events):
        event = Event(f"e{n}", user, item, kind, 10_000 + n, Source("t", 0, n))
        windows.setdefault(user, []).append(WindowEntry.from_event(event))
        requests.append(Request(event, tuple(windows[user])))
        per_user.setdefault(user, []).append(n)
    return requests, per_user, list(per_user)


def exclusion(
    priors: dict[str, list[WindowEntry]],
    events: list[tuple[str, str, str]],
    rule: tuple[str, ...] | None,
) -> tuple[list[set[int]], np.ndarray]:
    """What the worker excludes per request under ``rule`` (None: the default, every type)."""
    requests, per_user, users = batch_of(priors, events)
    prior_windows = [priors.get(user, []) for user in users]
    prior_items = [index_of([e.item_id for e in window]) for window in prior_windows]
    event_items = index_of([item for _, item, _ in events])
    request_user, rank = request_ranks(requests, users)
    typed = () if rule is None else typed_exclusion(requests, prior_windows, rule, index_of)
    exclude, known = seen_matrix(prior_items, request_user, rank, per_user, event_items, *typed)
    return [set(row.tolist()) - {0} for row in exclude], known


entries = st.tuples(st.sampled_from([*ITEMS, "unknown"]), st.sampled_from(TYPES))


@given(
    st.lists(st.lists(entries, max_size=5), min_size=1, max_size=3),
    st.lists(st.tuples(st.integers(0, 2), entries), min_size=1, max_size=10),
    st.sets(st.sampled_from(TYPES)),
)
def test_a_request_excludes_its_users_items_of_the_rules_types(
    prior_lists: list[list[tuple[str, str]]],
    batch: list[tuple[int, tuple[str, str]]],
    rule: set[str],
) -> None:
    priors = {
        f"u{u}": [WindowEntry(f"p{u}-{n}", item, kind, n) for n, (item, kind) in enumerate(pl)]
        for u, pl in enumerate(prior_lists)
    }
    events = [(f"u{u % len(prior_lists)}", item, kind) for u, (item, kind) in batch]
    got, known = exclusion(priors, events, tuple(rule))
    everything, known_default = exclusion(priors, events, None)
    for n, (user, _, _) in enumerate(events):
        history = [(e.item_id, e.event_type) for e in priors[user]] + [
            (item, kind) for u, item, kind in events[: n + 1] if u == user
        ]
        want = {int(index_of([item])[0]) for item, kind in history if kind in rule}
        assert got[n] == want
        assert everything[n] == {int(index_of([item])[0]) for item, _ in history}
    # whether the user gets the model or the popularity fallback does not depend on the rule
    assert known.tolist() == known_default.tolist()


@pytest.mark.parametrize(
    "rule", [("purchase",), ("purchase", "add_to_cart"), (), EVENT_TYPES], ids=str
)
def test_the_worker_excludes_what_offline_evaluation_excludes(
    tmp_path: Path, rule: tuple[str, ...]
) -> None:
    """The same typed log: offline, the items excluded before each user's test event
    (encoder.data.seen_items); in the worker, those excluded after the event before it, half
    the history in the users' windows and half in the batch."""
    pytest.importorskip("torch", reason="needs the training extra (pip install -e .[train])")
    from encoder.data import eval_batch, load_interactions, seen_items

    rng = np.random.default_rng(0)
    log = []
    for u in range(5):
        for n in range(int(rng.integers(3, 12))):
            item = ITEMS[int(rng.integers(0, len(ITEMS)))]
            kind = TYPES[int(rng.integers(0, len(TYPES)))]
            log.append({"user_id": f"u{u}", "item_id": item, "event_type": kind, "timestamp": n})
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in log))
    inter = load_interactions(path, item_ids=ITEMS)
    users = eval_batch(inter, "test", 50, 0).users
    offline = seen_items(inter, users, "test", excluded_type_indices(rule))

    priors: dict[str, list[WindowEntry]] = {}
    events = []
    for u in range(5):
        mine = [e for e in log if e["user_id"] == f"u{u}"][:-1]  # all but the test event
        half = len(mine) // 2
        priors[f"u{u}"] = [
            WindowEntry(f"p{u}-{n}", e["item_id"], e["event_type"], n)
            for n, e in enumerate(mine[:half])
        ]
        events += [(e["user_id"], e["item_id"], e["event_type"]) for e in mine[half:]]
    streamed, _ = exclusion(priors, events, rule)
    last = {user: n for n, (user, _, _) in enumerate(events)}  # each user's last request
    for row, seen in zip(users.tolist(), offline, strict=True):
        assert streamed[last[inter.user_ids[row]]] == set(seen.tolist()), inter.user_ids[row]


@pytest.mark.parametrize("rule", [("purchase",), EVENT_TYPES], ids=str)
def test_the_worker_recommends_what_offline_evaluation_ranks_under_the_rule(
    tmp_path: Path, rule: tuple[str, ...]
) -> None:
    """The exported model in the recommender against the torch model offline: after each
    user's second to last event, the same top 10 under the same rule."""
    pytest.importorskip("torch", reason="needs the training extra (pip install -e .[train])")
    from encoder.data import eval_batch, load_interactions, memory_horizon
    from encoder.evaluate import rankings
    from export.runtime import EncoderRuntime
    from streams.encoder_recommender import EncoderRecommender
    from streams.recommend import Batch
    from tests.streams.test_encoder_stream import ITEMS as MODEL_ITEMS
    from tests.streams.test_encoder_stream import make_bundle

    model, bundle = make_bundle(tmp_path, seed=7)
    rng = np.random.default_rng(1)
    log = []
    for u in range(6):
        for n in range(int(rng.integers(4, 16))):
            log.append(
                {
                    "user_id": f"u{u}",
                    "item_id": MODEL_ITEMS[int(rng.integers(0, 12))],  # repeats are common
                    "event_type": TYPES[int(rng.integers(0, len(TYPES)))],
                    "timestamp": 1_700_000_000_000 + 60_000 * n,
                }
            )
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in log))
    inter = load_interactions(path, item_ids=MODEL_ITEMS, n_time_buckets=model.cfg.n_time_buckets)
    batch = eval_batch(inter, "test", model.cfg.max_len, memory_horizon(model.cfg.memory_decay))
    (offline,) = rankings(model, inter, batch, "test", [None], 512, excluded_type_indices(rule))

    runtime = EncoderRuntime.load(bundle, device="cpu")
    priors: dict[str, tuple[WindowEntry, ...]] = {}
    windows: dict[str, list[WindowEntry]] = {}
    requests = []
    for u in range(6):
        mine = [e for e in log if e["user_id"] == f"u{u}"][:-1]  # all but the test event
        entries = [
            WindowEntry(f"e{u}-{n}", e["item_id"], e["event_type"], e["timestamp"])
            for n, e in enumerate(mine)
        ]
        half = len(entries) // 2
        priors[f"u{u}"] = tuple(entries[:half])
        windows[f"u{u}"] = list(entries[:half])
        for n, entry in enumerate(entries[half:]):
            event = Event(
                entry.event_id, f"u{u}", entry.item_id, entry.event_type, entry.timestamp_ms,
                Source("t", 0, 100 * u + n),
            )  # fmt: skip
            windows[f"u{u}"].append(entry)
            requests.append(Request(event, tuple(windows[f"u{u}"])))
    result = EncoderRecommender(runtime, cache_users=10, exclude_seen_types=rule).recommend(
        Batch(
            requests=requests,
            prior_windows=priors,
            stored={},
            prior_signatures={u: b"" for u in priors},
            final_signatures={u: b"after" for u in priors},
            popular=[],
            k=10,
        )
    )
    last = {r.event.user_id: n for n, r in enumerate(requests)}
    for row, top in zip(batch.users.tolist(), offline.top, strict=True):
        rec = result.recommendations[last[inter.user_ids[row]]]
        assert rec.item_ids == runtime.ids_of(top), inter.user_ids[row]
