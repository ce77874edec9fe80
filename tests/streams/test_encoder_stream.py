"""The encoder in the worker, on the real broker and Redis.

The streaming path must give the offline model's answers: a log replayed through the stream
(with a worker restart in the middle, so states are rebuilt from Redis windows and persisted
memory) leaves every user with the vector the torch model computes over the whole history.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

torch = pytest.importorskip("torch", reason="needs the training extra (pip install -e .[train])")

from encoder.data import load_interactions  # noqa: E402
from encoder.model import InterestEncoder  # noqa: E402
from export.bundle import export_bundle, save_model_dir  # noqa: E402
from streams.client import InterestClient  # noqa: E402
from streams.sample import sample_events  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.store import KeyLayout  # noqa: E402
from tests.conftest import WorkerProcess, interest, read_json, wait_for  # noqa: E402
from tests.export.conftest import tiny_model  # noqa: E402

N_ITEMS = 30
ITEMS = [f"item-{i}" for i in range(N_ITEMS)]


def make_bundle(tmp: Path, seed: int) -> tuple[InterestEncoder, Path]:
    model = tiny_model(n_items=N_ITEMS, seed=seed)
    model_dir = save_model_dir(model, ITEMS, tmp / f"model-{seed}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = export_bundle(model_dir=model_dir, out=tmp / f"bundle-{seed}")
    return model, bundle


def single_topic_events(users: int, per_user: int) -> list[dict[str, Any]]:
    """Sample events with purchases turned into views: one topic keeps each user in order."""
    events = list(sample_events(users=users, events_per_user=per_user, items=N_ITEMS, genres=3))
    for event in events:
        if event["event_type"] == "purchase":
            event["event_type"] = "view"
    return events


def stored_vectors(settings: Settings) -> dict[str, tuple[np.ndarray, str]]:
    client = redis.Redis.from_url(settings.redis_url)
    layout = KeyLayout(settings.redis_key_prefix)
    out = {}
    for key in client.scan_iter(match=layout.user("*")):
        user = key.decode().split("{", 1)[1].rstrip("}")
        vector, version = client.hmget(key, ["vector", "model_version"])
        out[user] = (np.frombuffer(vector, np.float32), version.decode())
    client.close()
    return out


def offline_vectors(
    model: InterestEncoder, events: list[dict[str, Any]], tmp: Path, n_time_buckets: int
) -> dict[str, np.ndarray]:
    path = tmp / "log.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    inter = load_interactions(path, item_ids=ITEMS, n_time_buckets=n_time_buckets)
    out = {}
    with torch.no_grad():
        for user, seq in zip(inter.user_ids, inter.sequences, strict=True):
            hidden = model(
                torch.from_numpy(seq.items)[None],
                torch.from_numpy(seq.types)[None],
                torch.from_numpy(seq.gaps)[None],
            )
            out[user] = hidden[0, -1].numpy()
    return out


def test_replayed_log_gives_the_offline_models_vectors_across_a_restart(
    settings: Settings, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    model, bundle = make_bundle(tmp_path, seed=1)
    events = single_topic_events(users=6, per_user=24)
    first = [e for e in events if int(e["event_id"].rsplit("-", 1)[1]) < 12]
    second = [e for e in events if e not in first]
    # Window 10 < history 24, receptive field 2*(5-1)+1 = 9 <= 10: after the restart every user
    # is rebuilt from its Redis window plus the persisted long-term memory.
    env = {"INTEREST_MODEL": str(bundle), "INTEREST_WINDOW_LENGTH": "10"}

    with InterestClient(settings) as client:
        client.push(first)
        worker = start_worker(**env)
        assert len(read_json(settings, settings.topic_recommendations, len(first), 60)) == len(
            first
        )
        worker.stop()
        start_worker(**env)
        client.push(second)
    recs = read_json(settings, settings.topic_recommendations, len(events), timeout=60)
    assert {r["trigger_event_id"] for r in recs} == {e["event_id"] for e in events}

    streamed = stored_vectors(settings)
    expected = offline_vectors(model, events, tmp_path, model.cfg.n_time_buckets)
    version = json.loads((bundle / "manifest.json").read_text())["version"]
    assert set(streamed) == set(expected)
    for user, (vector, stored_version) in streamed.items():
        assert stored_version == version
        np.testing.assert_allclose(vector, expected[user], atol=1e-4, err_msg=user)

    for rec in recs:
        assert rec["source"] == "encoder" and rec["model_version"] == version
        assert len(rec["items"]) == settings.top_k


def test_rollout_switches_version_between_batches_and_cold_users_get_popularity(
    settings: Settings,
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    _, bundle_a = make_bundle(tmp_path, seed=1)
    _, bundle_b = make_bundle(tmp_path, seed=2)
    version_a = json.loads((bundle_a / "manifest.json").read_text())["version"]
    version_b = json.loads((bundle_b / "manifest.json").read_text())["version"]
    assert version_a != version_b
    current = tmp_path / "current"
    current.symlink_to(bundle_a)
    worker = start_worker(
        INTEREST_MODEL=str(current),
        INTEREST_MODEL_POLL_SECONDS="0.2",
    )

    events = single_topic_events(users=4, per_user=10)
    cold = {
        "event_id": "cold-1",
        "user_id": "newcomer",
        "item_id": "never-seen",
        "event_type": "click",
        "timestamp": 1_767_300_000_000,
    }
    with InterestClient(settings) as client:
        client.push([*events[:20], cold])
        assert len(read_json(settings, settings.topic_recommendations, 21, timeout=60)) == 21
        tmp_link = tmp_path / "current.new"
        tmp_link.symlink_to(bundle_b)
        os.replace(tmp_link, current)  # atomic switch, as an operator would do it
        # Loaded beside the serving model, without traffic; the next batch runs on B.
        wait_for(lambda: f"{version_b} loaded" in worker.log(), 60, "the worker to load B")
        client.push(events[20:])
    recs = read_json(settings, settings.topic_recommendations, len(events) + 1, timeout=60)
    by_trigger = {r["trigger_event_id"]: r for r in recs}
    assert set(by_trigger) == {e["event_id"] for e in events} | {"cold-1"}  # nothing dropped
    assert {by_trigger[e["event_id"]]["model_version"] for e in events[:20]} == {version_a}
    assert {by_trigger[e["event_id"]]["model_version"] for e in events[20:]} == {version_b}
    assert by_trigger["cold-1"]["source"] == "popularity"
    assert by_trigger["cold-1"]["items"], "cold users still get recommendations"

    stats = interest("stats")  # live quality, as an operator reads it
    assert stats.returncode == 0, stats.stderr.decode()
    online = json.loads(stats.stdout)
    assert online[version_a]["events"] > 0
    assert online[version_b]["events"] > 0
    assert 0 <= online[version_b]["hits"] <= online[version_b]["events"]
    assert online[version_b]["hit_rate@10"] == round(
        online[version_b]["hits"] / online[version_b]["events"], 4
    )


def test_a_model_trained_without_types_or_times_is_fed_the_defaults(tmp_path: Path) -> None:
    from export.runtime import EncoderRuntime
    from streams.encoder_recommender import EncoderRecommender
    from streams.window import WindowEntry

    _, bundle = make_bundle(tmp_path, seed=3)
    window = [
        WindowEntry("a", "item-1", "click", 1_000_000),
        WindowEntry("b", "item-2", "purchase", 1_900_000),
    ]
    runtime = EncoderRuntime.load(bundle)
    items, types, gaps = EncoderRecommender(runtime)._features(window)
    assert types.tolist() == [0, 1] and gaps[1] > 0  # trained with both: real features

    runtime.manifest["config"].update(uses_event_types=False, uses_time_gaps=False)
    items, types, gaps = EncoderRecommender(runtime)._features(window)
    assert items.tolist() == [2, 3]
    assert types.tolist() == [0, 0] and gaps.tolist() == [0, 0]
