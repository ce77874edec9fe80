"""The store's per-user cache: least recently used out, and what a write leaves cached."""

from streams.store import UserWrite
from streams.user_cache import CachedUser, UserCache
from streams.window import UserState, WindowEntry


def _cached(
    offsets: bytes, vector: bytes | None = b"v", recs: list[str] | None = None
) -> CachedUser:
    return CachedUser(offsets, UserState(), vector, b"m", "x", recs)


def test_the_least_recently_used_user_goes_first() -> None:
    cache = UserCache(max_users=2)
    cache.put("a", _cached(b"1"))
    cache.put("b", _cached(b"1"))
    cache.touch("a")
    cache.touch("nobody")  # not cached: nothing to refresh
    cache.put("c", _cached(b"1"))
    assert list(cache.entries) == ["a", "c"]
    assert cache.peek("b") is None and cache.peek("nobody") is None


def test_a_cache_of_no_users_keeps_none() -> None:
    cache = UserCache(max_users=0)
    cache.put("a", _cached(b"1"))
    assert cache.peek("a") is None


def test_a_write_keeping_model_and_recs_takes_them_from_the_copy_it_read() -> None:
    cache = UserCache(max_users=10)
    cache.put("a", _cached(b"read", vector=b"v1", recs=["i1"]))
    state = UserState(window=[WindowEntry("e", "i", "click", 1)], offsets={"t/0": 1})
    cache.after_write("a", b"written", UserWrite(state, read_offsets=b"read"))
    entry = cache.peek("a")
    assert entry is not None
    assert (entry.raw_offsets, entry.state, entry.vector, entry.recs) == (
        b"written",
        state,
        b"v1",
        ["i1"],
    )


def test_a_write_of_everything_is_cached_without_a_copy_read() -> None:
    cache = UserCache(max_users=10)
    write = UserWrite(UserState(), vector=b"v2", memory=b"m2", model_version="y", recs=["i2"])
    cache.after_write("a", b"written", write)
    assert cache.peek("a") == CachedUser(b"written", write.state, b"v2", b"m2", "y", ["i2"])


def test_what_a_write_leaves_unknown_is_read_afresh() -> None:
    cache = UserCache(max_users=10)
    # No copy read: the model state it keeps is not known here.
    cache.after_write("a", b"w", UserWrite(UserState(), recs=["i"]))
    cache.after_write("b", b"w", UserWrite(UserState(), vector=b"v", memory=b"m"))
    # The copy read is not the one the write replaced (another writer came between).
    cache.put("c", _cached(b"theirs"))
    cache.after_write("c", b"w", UserWrite(UserState(), read_offsets=b"mine"))
    assert cache.entries == {}
