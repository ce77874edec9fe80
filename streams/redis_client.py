"""The Redis client the worker and the CLI open from settings, its commands packed in C."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

from streams.settings import Settings


class HiredisPacking:
    """Mixin for a redis.asyncio connection class: build commands with hiredis, in C.

    Why: redis-py's asyncio connections pack commands in Python, and a batch's write script
    carries ~9 arguments per user: packing a large batch's call in Python is a visible share
    of the worker's time, and hiredis packs the same bytes in C. The packer is redis-py's own,
    the one its sync connections use when hiredis is installed; a test compares its bytes with
    the asyncio one's.
    """

    _hiredis_serializer = HiredisRespSerializer()

    def pack_command(self, *args: object) -> list[bytes]:
        return self._hiredis_serializer.pack(*args)


def with_hiredis_packing(client: aioredis.Redis) -> aioredis.Redis:
    """The same client, its connections (TCP, TLS or Unix socket alike) packing with hiredis
    (unchanged where hiredis is not installed)."""
    pool = client.connection_pool
    base = pool.connection_class
    if HIREDIS_AVAILABLE and not issubclass(base, HiredisPacking):
        pool.connection_class = type(f"Hiredis{base.__name__}", (HiredisPacking, base), {})
    return client


def client_options(settings: Settings) -> dict[str, object]:
    """Credentials and TLS options, as both redis-py clients take them."""
    options: dict[str, object] = {"username": settings.redis_username}
    if settings.redis_password:
        options["password"] = settings.redis_password.get_secret_value()
    if settings.redis_ssl_ca_certs:  # TLS itself is chosen by a rediss:// URL
        options["ssl_ca_certs"] = str(settings.redis_ssl_ca_certs)
    return options


def connect(settings: Settings) -> aioredis.Redis | RedisCluster:
    """The worker's asyncio client: a cluster client (one node's URL finds the rest) with
    INTEREST_REDIS_CLUSTER, else one connection pool."""
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, **client_options(settings))
    return with_hiredis_packing(
        aioredis.Redis.from_url(settings.redis_url, **client_options(settings))
    )
