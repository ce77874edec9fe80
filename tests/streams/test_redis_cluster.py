"""The worker's state on a real Redis Cluster (three masters, redis-cli --cluster create):
per-user writes atomic and fenced, shared counters counted once per event, a worker killed
mid-stream and a resharding under load losing nothing and applying nothing twice."""

from __future__ import annotations

import asyncio
import math
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from streams.client import InterestClient
from streams.events import Source
from streams.popularity import Decay
from streams.redis_cluster import redis_cli
from streams.sample import sample_events
from streams.settings import Settings
from streams.stack import _terminate, free_port, redis_binary, start_redis_cluster
from streams.store import KeyLayout, StaleStateError, StateStore, UserWrite
from streams.topics import ensure_topics
from streams.window import UserState, WindowEntry
from tests.conftest import WorkerProcess, interest, read_json

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("redis-cluster")
    port = free_port()
    nodes = start_redis_cluster(home, port, redis_binary(), home / "redis.log")
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        for node in nodes:
            _terminate(node.pid)


@pytest.fixture
def cluster_settings(
    service_env: dict[str, str], cluster_url: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    for name, value in {
        "INTEREST_REDIS_URL": cluster_url,
        "INTEREST_REDIS_CLUSTER": "true",
    }.items():
        service_env[name] = value
        monkeypatch.setenv(name, value)
    settings = Settings()
    ensure_topics(settings)
    return settings


def _write(user: str, read_offsets: bytes | None, events: list[WindowEntry], n: int) -> UserWrite:
    state = UserState(list(events), {"clicks/0": n})
    return UserWrite(state, read_offsets=read_offsets, new_entries=events)


def _entry(i: int) -> WindowEntry:
    return WindowEntry(f"e{i}", f"item-{i % 3}", "click", 1_767_225_600_000 + i)


def test_the_store_reads_writes_and_fences_users_across_the_slots(
    cluster_settings: Settings,
) -> None:
    async def run() -> None:
        client = RedisCluster.from_url(cluster_settings.redis_url)
        store = StateStore(client, cluster_settings)
        users = [f"u{i}" for i in range(60)]
        read = await store.read_batch(users, popular_n=5)
        assert all(not read.users[u].state.window for u in users) and read.popular == []
        writes = {u: _write(u, None, [_entry(i)], i) for i, u in enumerate(users)}
        sources = [Source("clicks", 0, i) for i in range(len(users))]
        items = [(e.item_id, e.timestamp_ms) for w in writes.values() for e in w.new_entries]
        await store.write_batch(writes, items, None, {}, sources)
        fresh = StateStore(client, cluster_settings)  # no cache: everything from Redis
        again = await fresh.read_batch(users, popular_n=5)
        for i, u in enumerate(users):
            assert again.users[u].state.window == [_entry(i)]
        assert {item for item, _ in again.popular} == {"item-0", "item-1", "item-2"}
        # The users live on every master, not on one node.
        slots = {client.keyslot(store.keys.user(u)) for u in users}
        nodes = {client.get_node_from_key(store.keys.user(u)).name for u in users}
        assert len(slots) > 30 and len(nodes) == 3
        # Compare-and-set: a write from a stale read changes nothing.
        stale = {"u0": _write("u0", None, [_entry(99)], 99)}
        with pytest.raises(StaleStateError):
            await fresh.write_batch(stale, [], again.popularity_epoch_ms)
        assert (await fresh.read_user("u0")).state.window == [_entry(0)]
        await client.aclose()

    asyncio.run(run())


def test_shared_counters_count_each_event_once_under_replay(cluster_settings: Settings) -> None:
    """The popularity and online counters are written before the users: a replay of the same
    events (a crash in between) must not count them again, and later events still count."""

    async def run() -> dict[str, Any]:
        client = RedisCluster.from_url(cluster_settings.redis_url)
        store = StateStore(client, cluster_settings)
        events = [("a", 1_767_225_600_000 + i) for i in range(4)]
        sources = [Source("clicks", 1, 10 + i) for i in range(4)]
        online = [(sources[0], "v1", True), (sources[1], "v1", False)]
        epoch = events[0][1]  # as the worker's read would find it
        for _ in range(3):  # the same batch three times
            await store.write_batch({}, events, epoch, {}, sources, online)
        later = [("b", 1_767_225_600_100)]
        await store.write_batch({}, later, epoch, {}, [Source("clicks", 1, 14)])
        keys = store.keys
        out = {
            "popular": await client.zrange(keys.popularity, 0, -1, withscores=True),
            "online": await client.hgetall(keys.online),
            "counted": await client.hgetall(keys.counted),
            "epoch": int(await client.get(keys.popularity_epoch)),
        }
        await client.aclose()
        return out

    out = asyncio.run(run())
    decay = Decay(cluster_settings.popularity_half_life_seconds * 1000)
    expected = decay.increments([("a", 1_767_225_600_000 + i) for i in range(4)], out["epoch"])
    scores = {item.decode(): score for item, score in out["popular"]}
    assert math.isclose(scores["a"], expected["a"], rel_tol=1e-12)
    assert "b" in scores
    assert out["online"] == {b"events:v1": b"2", b"hits:v1": b"1"}
    assert out["counted"] == {b"clicks/1": b"14"}


def _windows(settings: Settings, users: list[str]) -> dict[str, list[str]]:
    """Each user's window in Redis, as event ids, oldest first."""
    client = redis.RedisCluster.from_url(settings.redis_url)
    keys = KeyLayout(settings.redis_key_prefix, cluster=True)
    out = {
        u: [orjson.loads(raw)["event_id"] for raw in client.lrange(keys.window(u), 0, -1)]
        for u in users
    }
    client.close()
    return out


def _start(start_worker: Callable[..., WorkerProcess], **env: str) -> WorkerProcess:
    return start_worker(INTEREST_BATCH_SIZE="50", **env)


def _events(users: int, per_user: int, seed: int) -> list[dict[str, Any]]:
    events = list(sample_events(users=users, events_per_user=per_user, items=40, seed=seed))
    return [{**e, "event_id": f"s{seed}-{e['event_id']}"} for e in events]


def test_a_worker_killed_mid_stream_loses_nothing_and_applies_nothing_twice(
    cluster_settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    first, second = _events(30, 20, seed=1), _events(30, 20, seed=2)
    worker = _start(start_worker)
    with InterestClient(cluster_settings) as client:
        client.push(first)
        read_json(cluster_settings, cluster_settings.topic_recommendations, 1, 60)
        worker.kill()  # SIGKILL mid-stream: batches in flight, offsets not committed
        _start(start_worker)
        client.push(second)
    _assert_each_applied_once(cluster_settings, first + second)


def test_resharding_under_load_loses_nothing(
    cluster_settings: Settings, start_worker: Callable[..., WorkerProcess], cluster_url: str
) -> None:
    """Slots move between masters while the worker reads and writes them (MOVED and ASK)."""
    events = _events(40, 30, seed=3)
    _start(start_worker)
    port = cluster_url.rsplit(":", 1)[1]
    nodes = redis.RedisCluster.from_url(cluster_url).get_primaries()
    source, target = nodes[0], nodes[1]
    with InterestClient(cluster_settings) as client:
        client.push(events[: len(events) // 3])
        moving = subprocess.Popen(
            [
                redis_cli(),
                "--cluster",
                "reshard",
                f"127.0.0.1:{port}",
                "--cluster-from",
                _node_id(source.port),
                "--cluster-to",
                _node_id(target.port),
                "--cluster-slots",
                "3000",
                "--cluster-yes",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        client.push(events[len(events) // 3 :])
        out, _ = moving.communicate(timeout=120)
    assert moving.returncode == 0, out.decode()[-800:]
    _assert_each_applied_once(cluster_settings, events)


def _assert_each_applied_once(settings: Settings, events: list[dict[str, Any]]) -> None:
    """Every event has its recommendation and sits in its user's window once, in time order
    (the window's order, whatever order the events arrived in)."""
    recs = read_json(settings, settings.topic_recommendations, len(events), 90)
    assert {r["trigger_event_id"] for r in recs} == {e["event_id"] for e in events}
    users = sorted({e["user_id"] for e in events})
    windows = _windows(settings, users)
    for user in users:
        sent = sorted((e for e in events if e["user_id"] == user), key=lambda e: e["timestamp"])
        assert windows[user] == [e["event_id"] for e in sent], user


def _node_id(port: int) -> str:
    done = subprocess.run(
        [redis_cli(), "-p", str(port), "cluster", "myid"], capture_output=True, text=True
    )
    return done.stdout.strip()


def test_interest_up_starts_a_cluster_the_commands_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"INTEREST_HOME": str(tmp_path)}
    monkeypatch.setenv("INTEREST_HOME", str(tmp_path))
    up = interest("up", "--redis-cluster", env=env, timeout=120)
    try:
        assert up.returncode == 0, up.stderr.decode()
        assert b"redis_cluster=true" in up.stdout
        settings = Settings()
        assert settings.redis_cluster
        info = redis.RedisCluster.from_url(settings.redis_url)
        assert len(info.get_primaries()) == 3
        info.close()
    finally:
        interest("down", env=env)
