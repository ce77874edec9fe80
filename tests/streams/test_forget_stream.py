"""Forgetting a user on the real broker and Redis, with the encoder, a worker SIGKILLed and
restarted around the request: nothing of the user's earlier events survives, the next
recommendations come from what followed the request alone, and every other user is untouched
and exactly-once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis

pytest.importorskip("torch", reason="needs the training extra (pip install -e .[train])")

from streams.client import InterestClient
from streams.settings import Settings
from streams.store import KeyLayout
from tests.conftest import WorkerProcess, read_json, read_records, wait_for
from tests.streams.test_encoder_stream import (
    make_bundle,
    offline_vectors,
    single_topic_events,
)
from tests.streams.test_worker import windows

FORGOTTEN = "user-0"


def sequence(event: dict) -> int:  # type: ignore[type-arg]
    return int(event["event_id"].rsplit("-", 1)[1])


def test_forget_mid_stream_across_a_worker_kill(
    settings: Settings, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    model, bundle = make_bundle(tmp_path, seed=4)
    env = {"INTEREST_MODEL": str(bundle), "INTEREST_WINDOW_LENGTH": "10"}
    events = single_topic_events(users=5, per_user=12)
    old = [e for e in events if sequence(e) < 8]
    rest = [e for e in events if sequence(e) >= 8]
    others_later = [e for e in rest if e["user_id"] != FORGOTTEN]
    new = [e for e in rest if e["user_id"] == FORGOTTEN]  # the user's history after the request
    assert len(new) == 4 and any(e["user_id"] == FORGOTTEN for e in old)
    # Both input topics: a purchase sent just before the request (in flight on `purchases`
    # while the request's `clicks` copy may be applied first) and one after it.
    in_flight = {**old[-1], "event_id": "in-flight", "user_id": FORGOTTEN, "event_type": "purchase"}
    # (the last one, pushed once the others are answered: a purchase that overtook an earlier
    # click would be inserted out of time order, which rebuilds only approximately)
    new[-1] = {**new[-1], "event_type": "purchase"}

    def answered(expected: list[dict]) -> bool:  # type: ignore[type-arg]
        recs = read_json(settings, settings.topic_recommendations, timeout=2)
        return {e["event_id"] for e in expected} <= {r["trigger_event_id"] for r in recs}

    worker = start_worker(**env)
    with InterestClient(settings) as client:
        client.push(old)
        read_json(settings, settings.topic_recommendations, len(old), timeout=60)
        client.push([*others_later[:6], in_flight])
        forget_id = client.forget(FORGOTTEN)
        client.push(others_later[6:10])
        worker.kill()  # wherever the request is: applied, written, committed or not
        worker = start_worker(**env)
        client.push(others_later[10:] + new[:-1])
        wait_for(lambda: answered(new[:-1]), 90, "the first new events to be answered")
        client.push(new[-1:])

    wait_for(lambda: answered(old + others_later + new), 90, "every event to be answered")
    store = redis.Redis.from_url(settings.redis_url)
    keys = KeyLayout(settings.redis_key_prefix)

    # Both copies of the request (clicks and purchases) applied: none pending.
    def both_copies() -> bool:
        mark = store.hget(keys.user(FORGOTTEN), "forget")
        return mark is not None and json.loads(mark) == {"pending": [], "done": [forget_id]}

    wait_for(both_copies, 60, "both copies of the request to be applied")

    # Redis: only what came after the request.
    state = windows(settings)
    assert [w["event_id"] for w in state[FORGOTTEN]] == [e["event_id"] for e in new]
    fields = {k.decode() for k in store.hgetall(keys.user(FORGOTTEN))}
    assert fields <= {
        "offsets",
        "updated_ms",
        "vector",
        "memory",
        "model_version",
        "recs",
        "forget",
    }
    vector = np.frombuffer(store.hget(keys.user(FORGOTTEN), "vector"), np.float32)
    expected = offline_vectors(model, new, tmp_path, model.cfg.n_time_buckets)[FORGOTTEN]
    np.testing.assert_allclose(vector, expected, atol=1e-4)  # as if the user were new
    store.close()

    # The topic: a tombstone, then only answers to the new events.
    mine = [
        r
        for r in read_records(settings, settings.topic_recommendations)
        if r.key == FORGOTTEN.encode()
    ]
    tombstones = [i for i, r in enumerate(mine) if r.value is None]
    assert tombstones, "no tombstone for the forgotten user"
    after = [json.loads(r.value) for r in mine[tombstones[-1] + 1 :]]
    assert {r["trigger_event_id"] for r in after} == {e["event_id"] for e in new}
    last = after[-1]
    assert last["trigger_event_id"] == new[-1]["event_id"] and last["source"] == "encoder"
    assert not ({i["item_id"] for i in last["items"]} & {e["item_id"] for e in new})

    # Everyone else: every event in its window exactly once, in time order.
    for user in {e["user_id"] for e in events} - {FORGOTTEN}:
        mine_events = sorted(
            (e for e in events if e["user_id"] == user), key=lambda e: e["timestamp"]
        )
        expected_ids = [e["event_id"] for e in mine_events][-10:]
        assert [w["event_id"] for w in state[user]] == expected_ids, user
