"""StateStore against the real Redis of the embedded stack; pins the key layout."""

import asyncio
import json

import redis

from streams.settings import Settings
from streams.store import KeyLayout, StateStore, UserWrite, connect
from streams.window import UserState, WindowEntry


def run(coro):
    return asyncio.run(coro)


def test_key_layout_is_stable() -> None:
    keys = KeyLayout("is")
    assert keys.user("alice") == "is:user:{alice}"
    assert keys.popularity == "is:popularity"
    assert keys.popularity_epoch == "is:popularity:epoch_ms"


async def _write_and_read(settings: Settings) -> None:
    client = connect(settings)
    store = StateStore(client, settings)
    state = UserState(
        window=[
            WindowEntry("e1", "i1", "click", 1_000),
            WindowEntry("e2", "i2", "purchase", 2_000),
        ],
        offsets={"clicks/3": 17},
    )
    await store.write_batch(
        {"alice": UserWrite(state, vector=b"\x00\x00\x80?", model_version="m1")},
        [("i1", 1_000), ("i2", 2_000)],
        None,
    )
    read = await store.read_batch(["alice", "bob"], popular_n=10)
    assert read.users["alice"].state.window == state.window
    assert read.users["alice"].state.offsets == {"clicks/3": 17}
    assert read.users["alice"].model_version == "m1"
    assert read.users["bob"].state.window == []
    assert [item for item, _ in read.popular] == ["i2", "i1"]  # newer event weighs more
    await client.aclose()


def test_write_then_read_uses_documented_keys(settings: Settings) -> None:
    run(_write_and_read(settings))
    raw = redis.Redis.from_url(settings.redis_url)
    prefix = settings.redis_key_prefix
    assert sorted(k.decode() for k in raw.keys(f"{prefix}:*")) == [
        f"{prefix}:popularity",
        f"{prefix}:popularity:epoch_ms",
        f"{prefix}:user:{{alice}}",
    ]
    fields = raw.hgetall(f"{prefix}:user:{{alice}}")
    assert set(fields) == {b"window", b"offsets", b"updated_ms", b"vector", b"model_version"}
    assert json.loads(fields[b"window"])[0] == {
        "event_id": "e1",
        "item_id": "i1",
        "event_type": "click",
        "timestamp": 1000,
    }
    ttl = raw.pttl(f"{prefix}:user:{{alice}}")
    assert 0 < ttl <= settings.state_ttl_seconds * 1000


async def _rebase(settings: Settings) -> None:
    client = connect(settings)
    store = StateStore(client, settings)
    half_life = int(settings.popularity_half_life_seconds * 1000)
    await store.write_batch({}, [("old", 0), ("old", 1)], None)
    # Far in the future: forces a rebase of the weights; ordering must survive it.
    await store.write_batch({}, [("new", 300 * half_life)], 0)
    read = await store.read_batch([], popular_n=5)
    assert read.popularity_epoch_ms is not None and read.popularity_epoch_ms > 0
    assert read.popular[0][0] == "new"
    await client.aclose()


def test_popularity_rebase_keeps_weights_finite(settings: Settings) -> None:
    run(_rebase(settings))
