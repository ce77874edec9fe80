"""StateStore against the real Redis of the embedded stack; pins the key layout."""

import asyncio
import json
import math
import time

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

import streams.store
from streams.redis_client import connect
from streams.settings import Settings
from streams.store import (
    KeyLayout,
    StaleStateError,
    StateStore,
    StoredUser,
    UserWrite,
    decode_window,
    encode_entry,
    encode_offsets,
)
from streams.window import UserState, WindowEntry


def run(coro):
    return asyncio.run(coro)


def test_key_layout_is_stable() -> None:
    keys = KeyLayout("is")
    assert keys.user("alice") == "is:user:{alice}"
    assert keys.window("alice") == "is:window:{alice}"
    assert keys.popularity == "is:popularity"
    assert keys.popularity_epoch == "is:popularity:epoch_ms"
    assert keys.online == "is:online"
    # Redis Cluster: the shared keys in one slot (one hash tag), the users' as on one Redis.
    cluster = KeyLayout("is", cluster=True)
    assert cluster.user("alice") == keys.user("alice")
    assert cluster.window("alice") == keys.window("alice")
    assert cluster.popularity == "is:{shared}:popularity"
    assert cluster.popularity_epoch == "is:{shared}:popularity:epoch_ms"
    assert cluster.online == "is:{shared}:online"
    assert cluster.counted == "is:{shared}:counted"


def test_the_documented_key_layout_is_the_one_used() -> None:
    keys = KeyLayout("{prefix}")
    documented = streams.store.__doc__
    assert documented is not None
    for key in (
        keys.user("<user_id>"),
        keys.window("<user_id>"),
        keys.popularity,
        keys.popularity_epoch,
        keys.online,
    ):
        assert f"\n    {key} " in documented, key


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
        {
            "alice": UserWrite(
                state,
                new_entries=state.window,
                vector=b"\x00\x00\x80?",
                memory=b"\x00\x00\x00@",
                model_version="m1",
                recs=["i3"],
            )
        },
        [("i1", 1_000), ("i2", 2_000)],
        None,
        {"events:m1": 2, "hits:m1": 1},
    )
    read = await store.read_batch(["alice", "bob"], popular_n=10)
    assert read.users["alice"].state.window == state.window
    assert read.users["alice"].state.offsets == {"clicks/3": 17}
    assert read.users["alice"].model_version == "m1"
    assert read.users["alice"].memory == b"\x00\x00\x00@"
    assert read.users["alice"].recs == ["i3"]
    assert await store.online_counters() == {"events:m1": 2, "hits:m1": 1}
    # A second store (another worker, or after a restart) has no cache: same answer from Redis.
    fresh = await StateStore(client, settings).read_batch(["alice"], popular_n=10)
    assert fresh.users["alice"].state.window == state.window
    assert read.users["bob"].state.window == []
    assert [item for item, _ in read.popular] == ["i2", "i1"]  # newer event weighs more
    await client.aclose()


def test_write_then_read_uses_documented_keys(settings: Settings) -> None:
    run(_write_and_read(settings))
    raw = redis.Redis.from_url(settings.redis_url)
    prefix = settings.redis_key_prefix
    assert sorted(k.decode() for k in raw.keys(f"{prefix}:*")) == [
        f"{prefix}:online",
        f"{prefix}:popularity",
        f"{prefix}:popularity:epoch_ms",
        f"{prefix}:user:{{alice}}",
        f"{prefix}:window:{{alice}}",
    ]
    fields = raw.hgetall(f"{prefix}:user:{{alice}}")
    assert set(fields) == {
        b"offsets",
        b"updated_ms",
        b"vector",
        b"memory",
        b"model_version",
        b"recs",
    }
    assert json.loads(fields[b"offsets"]) == {"clicks/3": 17}
    window = [json.loads(e) for e in raw.lrange(f"{prefix}:window:{{alice}}", 0, -1)]
    assert len(window) == 2
    assert window[0] == {
        "event_id": "e1",
        "item_id": "i1",
        "event_type": "click",
        "timestamp": 1000,
    }
    for key in (f"{prefix}:user:{{alice}}", f"{prefix}:window:{{alice}}"):
        assert 0 < raw.pttl(key) <= settings.state_ttl_seconds * 1000


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


async def _append_trim_replace(settings: Settings) -> None:
    client = connect(settings)
    store = StateStore(client, settings)
    raw = redis.Redis.from_url(settings.redis_url)
    key = KeyLayout(settings.redis_key_prefix).window("bob")

    def entry(n: int) -> WindowEntry:
        return WindowEntry(f"e{n}", f"i{n}", "click", 1000 + n)

    def ids() -> list[str]:
        return [json.loads(e)["event_id"] for e in raw.lrange(key, 0, -1)]

    state = UserState(window=[entry(0), entry(1), entry(2)], offsets={"clicks/0": 2})
    await store.write_batch({"bob": UserWrite(state, new_entries=state.window)}, [], None)
    # Append two, window length 3: the oldest two are trimmed in Redis too.
    state = UserState(window=[entry(2), entry(3), entry(4)], offsets={"clicks/0": 4})
    read_offsets = encode_offsets({"clicks/0": 2})
    await store.write_batch(
        {"bob": UserWrite(state, read_offsets=read_offsets, new_entries=[entry(3), entry(4)])},
        [],
        None,
    )
    assert ids() == ["e2", "e3", "e4"]
    # An out-of-order insert rewrites the whole window.
    state = UserState(window=[entry(2), entry(9), entry(4)], offsets={"clicks/0": 5})
    read_offsets = encode_offsets({"clicks/0": 4})
    await store.write_batch(
        {"bob": UserWrite(state, read_offsets=read_offsets, replace=True)}, [], None
    )
    assert ids() == ["e2", "e9", "e4"]
    # Nothing new, but the oldest aged out (window_max_age): trimmed all the same.
    state = UserState(window=[entry(9), entry(4)], offsets={"clicks/0": 5, "clicks/1": 0})
    read_offsets = encode_offsets({"clicks/0": 5})
    await store.write_batch({"bob": UserWrite(state, read_offsets=read_offsets)}, [], None)
    assert ids() == ["e9", "e4"]
    raw.close()
    await client.aclose()


def test_window_list_appends_trims_and_replaces(settings: Settings) -> None:
    run(_append_trim_replace(settings))


async def _two_writers(settings: Settings) -> None:
    client = connect(settings)
    first, second = StateStore(client, settings), StateStore(client, settings)
    a, b = await first.read_batch(["carol"], 5), await second.read_batch(["carol"], 5)
    entry = WindowEntry("e1", "i1", "click", 1_000)
    state = UserState(window=[entry], offsets={"clicks/0": 1})
    await first.write_batch(
        {"carol": UserWrite(state, read_offsets=a.users["carol"].raw_offsets, new_entries=[entry])},
        [],
        None,
    )
    # The second writer read before the first wrote: it must not interleave (a zombie worker).
    with pytest.raises(StaleStateError):
        await second.write_batch(
            {
                "carol": UserWrite(
                    state, read_offsets=b.users["carol"].raw_offsets, new_entries=[entry]
                )
            },
            [("i1", 1_000)],
            None,
        )
    again = await second.read_batch(["carol"], 5)
    assert again.users["carol"].state.window == [entry]  # written once
    assert again.popular == []  # the refused write changed nothing, popularity included
    await client.aclose()


def test_a_writer_with_stale_state_is_refused_and_changes_nothing(settings: Settings) -> None:
    run(_two_writers(settings))


def _fields(user: StoredUser) -> tuple:
    return (
        user.state.window,
        user.state.offsets,
        user.raw_offsets or b"",
        user.vector,
        user.memory,
        user.model_version,
        user.recs,
    )


async def _cached_reads(settings: Settings) -> None:
    client = connect(settings)
    store = StateStore(client, settings)
    e1, e2 = WindowEntry("e1", "i1", "click", 1_000), WindowEntry("e2", "i2", "click", 2_000)
    first = UserState(window=[e1], offsets={"clicks/0": 1})
    await store.write_batch(
        {
            "erin": UserWrite(
                first, new_entries=[e1], vector=b"v1", memory=b"m1", model_version="a", recs=["i9"]
            )
        },
        [],
        None,
    )
    read = await store.read_batch(["erin"], 5)
    # A write that leaves the model state and recs as they were (vector/recs None).
    second = UserState(window=[e1, e2], offsets={"clicks/0": 2})
    await store.write_batch(
        {"erin": UserWrite(second, read_offsets=read.users["erin"].raw_offsets, new_entries=[e2])},
        [],
        None,
    )
    cached = await store.read_batch(["erin"], 5)
    fresh = await StateStore(client, settings).read_batch(["erin"], 5)
    assert _fields(cached.users["erin"]) == _fields(fresh.users["erin"])
    assert cached.users["erin"].vector == b"v1" and cached.users["erin"].recs == ["i9"]

    # Another worker writes the user: this worker's copy is stale and must not be used.
    other = StateStore(client, settings)
    theirs = await other.read_batch(["erin"], 5)
    e3 = WindowEntry("e3", "i3", "click", 3_000)
    third = UserState(window=[e1, e2, e3], offsets={"clicks/0": 3})
    await other.write_batch(
        {
            "erin": UserWrite(
                third,
                read_offsets=theirs.users["erin"].raw_offsets,
                new_entries=[e3],
                vector=b"v2",
                memory=b"m2",
                model_version="b",
                recs=["i8"],
            )
        },
        [],
        None,
    )
    again = await store.read_batch(["erin"], 5)
    assert again.users["erin"].state.window == [e1, e2, e3]
    assert (again.users["erin"].vector, again.users["erin"].recs) == (b"v2", ["i8"])
    # The batch changes what it was handed; the cached copy stays as Redis holds it.
    again.users["erin"].state.window.append(WindowEntry("e4", "i4", "click", 4_000))
    again.users["erin"].state.offsets["clicks/0"] = 4
    assert _fields((await store.read_batch(["erin"], 5)).users["erin"]) == _fields(
        (await StateStore(client, settings).read_batch(["erin"], 5)).users["erin"]
    )
    await client.aclose()


def test_cached_reads_answer_what_redis_holds(settings: Settings) -> None:
    run(_cached_reads(settings))


async def _evicted_while_read(settings: Settings) -> None:
    client = connect(settings)
    store = StateStore(client, settings.model_copy(update={"window_cache_users": 2}))
    entries = {user: WindowEntry(f"{user}1", "i1", "click", 1_000) for user in ("a", "b")}
    for user, entry in entries.items():  # cached: a (least recently used), then b
        state = UserState(window=[entry], offsets={"clicks/0": 1})
        write = UserWrite(
            state, new_entries=[entry], vector=b"v", memory=b"m", model_version="x", recs=["i"]
        )
        await store.write_batch({user: write}, [], None)
    # c is a miss: caching it evicts a, whose offsets were sent and whom Redis answers `false`.
    read = await store.read_batch(["c", "a"], 5)
    assert read.users["a"].state.window == [entries["a"]]
    assert read.users["c"].state.window == []
    await client.aclose()


def test_a_user_evicted_from_the_cache_during_a_read_is_still_answered(
    settings: Settings,
) -> None:
    run(_evicted_while_read(settings))


async def _huge_window(settings: Settings) -> None:
    client = connect(settings)
    store = StateStore(client, settings)
    window = [WindowEntry(f"e{n}", f"i{n}", "click", 1_000 + n) for n in range(9_000)]
    state = UserState(window=window, offsets={"clicks/0": 9_000})
    await store.write_batch({"dave": UserWrite(state, replace=True)}, [], None)
    fresh = await StateStore(client, settings).read_batch(["dave"], 5)
    assert fresh.users["dave"].state.window == window
    await client.aclose()


def test_windows_longer_than_lua_unpack_limit_are_written(settings: Settings) -> None:
    run(_huge_window(settings))


async def _future_event(settings: Settings) -> None:
    client = connect(settings)
    store = StateStore(client, settings)
    now = int(time.time() * 1000)
    year = 365 * 24 * 3600 * 1000
    await store.write_batch({}, [("hot", now)] * 3, None)
    read = await store.read_batch([], 5)
    # A clock bug stamps one event next year: it counts as "now", not as the only item.
    ranked = store.merge_popularity(
        read.popular, [("future", now + year)], read.popularity_epoch_ms
    )
    assert ranked[0][0] == "hot"
    await store.write_batch({}, [("future", now + year)], read.popularity_epoch_ms)
    read = await store.read_batch([], 5)
    assert read.popular[0][0] == "hot"
    assert all(math.isfinite(score) for _, score in read.popular)
    await client.aclose()


def test_future_timestamps_neither_overflow_nor_take_over_popularity(settings: Settings) -> None:
    run(_future_event(settings))


@given(
    st.text(min_size=1),
    st.text(min_size=1),
    st.sampled_from(["click", "purchase", "view", "add_to_cart"]),
    st.integers(min_value=0, max_value=2**53),
)
def test_window_entries_round_trip_in_the_documented_json(
    event_id: str, item_id: str, event_type: str, timestamp: int
) -> None:
    entry = WindowEntry(event_id, item_id, event_type, timestamp)
    raw = encode_entry(entry)
    assert json.loads(raw) == {
        "event_id": event_id,
        "item_id": item_id,
        "event_type": event_type,
        "timestamp": timestamp,
    }
    assert decode_window([raw, raw]) == [entry, entry]
    assert decode_window([]) == []


async def _forget(settings: Settings) -> None:
    from streams.window import ForgetMark

    client = connect(settings)
    store = StateStore(client, settings)
    raw = redis.Redis.from_url(settings.redis_url)
    keys = KeyLayout(settings.redis_key_prefix)
    old = UserState([WindowEntry("e1", "i1", "click", 1)], {"clicks/0": 4})
    await store.write_batch(
        {
            "bob": UserWrite(
                old,
                new_entries=old.window,
                vector=b"v",
                memory=b"m",
                model_version="m1",
                recs=["i2"],
            )
        },
        [],
        None,
    )
    read = (await store.read_batch(["bob"], popular_n=1)).users["bob"]
    # The forget, then one event after it; the copy on the other topic is still to come.
    after = UserState(
        [WindowEntry("e9", "i9", "click", 9)],
        {"clicks/0": 6},
        forgetting=ForgetMark(pending=(("f1", ("clicks",)),)),
    )
    write = UserWrite(
        after, read_offsets=read.raw_offsets, replace=True, wipe=True, mark_changed=True
    )
    await store.write_batch({"bob": write}, [], None)
    fields = {k.decode(): v for k, v in raw.hgetall(keys.user("bob")).items()}
    assert set(fields) == {"offsets", "updated_ms", "forget"}
    assert json.loads(fields["forget"]) == {"pending": [["f1", ["clicks"]]], "done": []}
    assert raw.lrange(keys.window("bob"), 0, -1) == [encode_entry(after.window[0])]
    for user in (
        (await store.read_batch(["bob"], popular_n=1)).users["bob"],
        await StateStore(client, settings).read_user("bob"),
    ):  # cached, then fresh
        assert user is not None
        assert (user.vector, user.memory, user.model_version, user.recs) == (None,) * 4
        assert user.state.forgetting == ForgetMark(pending=(("f1", ("clicks",)),))
    # The other topic's copy arrives: the request is done, nothing else changes.
    read = (await store.read_batch(["bob"], popular_n=1)).users["bob"]
    done = UserState(
        after.window, {"clicks/0": 6, "purchases/0": 2}, forgetting=ForgetMark(done=("f1",))
    )
    await store.write_batch(
        {"bob": UserWrite(done, read_offsets=read.raw_offsets, mark_changed=True)}, [], None
    )
    fields = {k.decode(): v for k, v in raw.hgetall(keys.user("bob")).items()}
    assert set(fields) == {"offsets", "updated_ms", "forget"}
    assert json.loads(fields["forget"]) == {"pending": [], "done": ["f1"]}
    # A mark cleared altogether is deleted.
    read = (await store.read_batch(["bob"], popular_n=1)).users["bob"]
    cleared = UserState(after.window, done.offsets)
    await store.write_batch(
        {"bob": UserWrite(cleared, read_offsets=read.raw_offsets, mark_changed=True)}, [], None
    )
    assert {k.decode() for k in raw.hgetall(keys.user("bob"))} == {"offsets", "updated_ms"}
    raw.close()
    await client.aclose()


def test_a_forget_leaves_only_offsets_and_what_came_after(settings: Settings) -> None:
    run(_forget(settings))
