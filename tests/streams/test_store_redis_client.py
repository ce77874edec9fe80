"""The hiredis packing of the worker's Redis connections: the same bytes, the same transport."""

import pytest
import redis
import redis.asyncio
from hypothesis import given
from hypothesis import strategies as st

from streams.redis_client import HiredisPacking, connect, with_hiredis_packing
from streams.settings import Settings

_redis_args = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=20),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)


@given(st.lists(_redis_args, min_size=0, max_size=30))
def test_hiredis_packing_sends_the_bytes_redis_py_would(args: list) -> None:
    plain = redis.asyncio.Connection()
    fast = with_hiredis_packing(redis.asyncio.Redis()).connection_pool.connection_class()
    for command in (("EVALSHA", *args), ("SCRIPT LOAD", *args), (b"HSET", *args)):
        assert b"".join(fast.pack_command(*command)) == b"".join(plain.pack_command(*command))


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("redis://localhost:6379/0", redis.asyncio.Connection),
        ("rediss://localhost:6380/0", redis.asyncio.SSLConnection),
        ("unix:///tmp/redis.sock", redis.asyncio.UnixDomainSocketConnection),
    ],
)
def test_hiredis_packing_keeps_the_transport_the_url_chose(url: str, base: type) -> None:
    client = connect(Settings(redis_url=url))
    connection_class = client.connection_pool.connection_class
    assert issubclass(connection_class, base) and issubclass(connection_class, HiredisPacking)
    assert with_hiredis_packing(client).connection_pool.connection_class is connection_class


def test_hiredis_packing_refuses_what_redis_py_refuses() -> None:
    fast = with_hiredis_packing(redis.asyncio.Redis()).connection_pool.connection_class()
    for bad in (None, True, [1]):
        with pytest.raises(redis.exceptions.DataError):
            redis.asyncio.Connection().pack_command("SET", "k", bad)
        with pytest.raises(redis.exceptions.DataError):
            fast.pack_command("SET", "k", bad)
