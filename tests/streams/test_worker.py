"""The worker on the real embedded broker and Redis: events in, state and recommendations out."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from kafka import KafkaProducer

from streams.client import InterestClient
from streams.sample import sample_events
from streams.settings import Settings
from streams.store import KeyLayout
from tests.conftest import WorkerProcess, read_json, wait_for


def windows(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    client = redis.Redis.from_url(settings.redis_url)
    layout = KeyLayout(settings.redis_key_prefix)
    result = {}
    for key in client.scan_iter(match=layout.window("*")):
        user = key.decode().split("{", 1)[1].rstrip("}")
        result[user] = [json.loads(entry) for entry in client.lrange(key, 0, -1)]
    client.close()
    return result


def applied(settings: Settings) -> int:
    """Events in all users' windows."""
    return sum(len(w) for w in windows(settings).values())


def assert_every_event_applied_once(settings: Settings, events: list[dict[str, Any]]) -> None:
    """Each user's window holds its events exactly once, in time order, and every event
    produced a recommendation (a replay republishes the same id)."""
    state = windows(settings)
    expected: dict[str, list[str]] = {}
    for e in sorted(events, key=lambda e: e["timestamp"]):
        expected.setdefault(e["user_id"], []).append(e["event_id"])
    for user, ids in expected.items():
        assert [w["event_id"] for w in state[user]] == ids, f"user {user}"
    recs = read_json(settings, settings.topic_recommendations, len(events), timeout=30)
    assert {r["trigger_event_id"] for r in recs} == {e["event_id"] for e in events}
    ids_per_trigger: dict[str, set[str]] = {}
    for r in recs:
        ids_per_trigger.setdefault(r["trigger_event_id"], set()).add(r["recommendation_id"])
    assert all(len(ids) == 1 for ids in ids_per_trigger.values())


def test_events_become_state_recommendations_and_dead_letters(
    settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    events = list(sample_events(users=8, events_per_user=6, items=60))
    bad = [
        b"not json",
        b'{"user_id": "u", "item_id": "i", "event_type": "like", "timestamp": 1700000000000}',
        b'{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": NaN}',
        b'{"user_id": "u", "item_id": "\xff", "event_type": "click", "timestamp": 1700000000000}',
    ]
    with InterestClient(settings) as client:
        client.push(events)
        client.push(bad)
    # A key that disagrees with user_id would break per-user ordering: rejected too.
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    producer.send(settings.topic_clicks, key=b"someone-else", value=json.dumps(events[0]).encode())
    producer.flush()
    producer.close()

    worker = start_worker()
    recs = read_json(settings, settings.topic_recommendations, len(events), timeout=60)
    assert len(recs) == len(events), worker.log()
    assert {r["trigger_event_id"] for r in recs} == {e["event_id"] for e in events}
    by_user = Counter(r["user_id"] for r in recs)
    assert set(by_user.values()) == {6}

    dlq = read_json(settings, settings.topic_dlq, 5, timeout=30)
    reasons = sorted(d["error"] for d in dlq)
    assert len(dlq) == 5
    assert any("not JSON" in r for r in reasons)
    assert any("event_type" in r for r in reasons)
    assert any("non-finite" in r for r in reasons)
    assert any("UTF-8" in r for r in reasons)
    assert any("key does not match" in r for r in reasons)
    assert all({"topic", "partition", "offset", "raw"} <= set(d) for d in dlq)

    state = windows(settings)
    assert set(state) == {e["user_id"] for e in events}  # the rejects touched nothing
    for user, window in state.items():
        pushed = sorted((e for e in events if e["user_id"] == user), key=lambda e: e["timestamp"])
        assert [w["event_id"] for w in window] == [e["event_id"] for e in pushed]

    for rec in recs:
        assert rec["model_version"] and rec["items"]
        assert len(rec["items"]) <= settings.top_k
        scores = [item["score"] for item in rec["items"]]
        assert scores == sorted(scores, reverse=True)
    # The last recommendation of each user excludes everything in its final window.
    last = {r["user_id"]: r for r in sorted(recs, key=lambda r: r["event_timestamp"])}
    for user, rec in last.items():
        seen = {w["item_id"] for w in state[user]}
        assert not seen & {item["item_id"] for item in rec["items"]}


def test_sigkill_mid_stream_loses_nothing_and_applies_nothing_twice(
    settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    users, per_user = 200, 60
    events = list(sample_events(users=users, events_per_user=per_user, items=500, seed=3))
    with InterestClient(settings) as client:
        client.push(events)
    total = len(events)

    worker = start_worker(INTEREST_BATCH_SIZE="200")
    wait_for(
        lambda: 0 < applied(settings) < total * 0.8,
        timeout=60,
        interval=0.05,
        what="the worker to be part-way through the backlog",
    )
    worker.kill()
    applied_before_kill = applied(settings)
    assert applied_before_kill < total

    start_worker()
    wait_for(
        lambda: applied(settings) >= total,
        timeout=120,
        what="the restarted worker to finish the backlog",
    )
    assert_every_event_applied_once(settings, events)


def test_a_worker_joining_and_another_dying_mid_stream_apply_every_event_once(
    settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    """Two workers in one group: a rebalance when the second joins, a SIGKILL of the first
    (its partitions move once its session expires), events pushed throughout."""
    events = list(sample_events(users=120, events_per_user=60, items=500, seed=11))
    phases = [events[i::3] for i in range(3)]  # each phase spans every user and the whole time

    with InterestClient(settings) as client:
        client.push(phases[0])
    first = start_worker(INTEREST_BATCH_SIZE="50")
    wait_for(lambda: applied(settings) > 0, timeout=60, what="the first worker to start applying")
    second = start_worker(INTEREST_BATCH_SIZE="50")
    wait_for(  # aiokafka logs the assignment at INFO (the fixture's log level)
        lambda: "newly assigned partitions" in second.log(),
        timeout=90,
        what="the second worker to be given partitions",
    )
    with InterestClient(settings) as client:
        client.push(phases[1])
    wait_for(
        lambda: applied(settings) >= len(phases[0]) + len(phases[1]) // 2,
        timeout=90,
        interval=0.1,
        what="both workers to apply part of the second phase",
    )
    first.kill()
    with InterestClient(settings) as client:
        client.push(phases[2])
    wait_for(
        lambda: applied(settings) >= len(events),
        timeout=180,
        what="the surviving worker to apply everything",
    )

    assert_every_event_applied_once(settings, events)


def test_the_worker_does_not_turn_on_debug_logging(tmp_path: Path) -> None:
    # faust's progress spinner sets the root logger to DEBUG, and every aiokafka send then
    # builds a debug record; the worker must log at the level the settings say.
    from streams.worker import create_app, create_worker

    settings = Settings(bootstrap_servers="127.0.0.1:9", group_id="g-logging")
    worker = create_worker(create_app(settings, tmp_path), settings)
    root = logging.Logger("probe-root")
    root.addHandler(logging.NullHandler())
    worker.on_setup_root_logger(root, logging.WARNING)
    assert root.level != logging.DEBUG
    assert len(root.handlers) == 1


def test_tune_gc_freezes_startup_objects_and_raises_the_thresholds() -> None:
    import gc

    from streams.worker import GC_THRESHOLDS, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0  # what was loaded so far is never rescanned
        assert gc.isenabled()  # cycles are still collected
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
