"""Redis state: one small interface, two round trips per micro-batch (read, then atomic write).

Key layout (pinned by tests/streams/test_store.py; change it only with a migration):

    {prefix}:user:{<user_id>}          hash, one per user, expires after state_ttl_seconds idle
        window        JSON list of {event_id, item_id, event_type, timestamp}, oldest first
        offsets       JSON {"topic/partition": highest offset applied}, the replay guard
        updated_ms    wall-clock time of the last write
        vector        float32 little-endian bytes, the interest vector (encoder only)
        memory        float32 bytes, the encoder's long-term memory after the newest event
        model_version the bundle version that produced `vector` and `memory`
        recs          JSON list of the item ids last recommended (for online hit rate)
    {prefix}:popularity                zset item_id -> exponentially decayed event count
    {prefix}:popularity:epoch_ms       reference time of the popularity weights
    {prefix}:online                    hash: "events:<version>", "hits:<version>" counters of
                                       events that were in the recommendation made before them

The braces around the user id are a Redis Cluster hash tag: everything about one user lives in
one slot. Writes for a batch go in one MULTI/EXEC, so a crash leaves either the whole batch or
none of it; together with the `offsets` guard a replayed batch changes nothing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis

from streams.settings import Settings
from streams.window import UserState, WindowEntry

# Popularity weights are 2 ** ((t - epoch) / half_life); rebase before they leave float range.
REBASE_AFTER_HALF_LIVES = 256

_REBASE_SCRIPT = """
local current = tonumber(redis.call('GET', KEYS[2]))
if current and current < tonumber(ARGV[1]) then
  redis.call('ZUNIONSTORE', KEYS[1], 1, KEYS[1], 'WEIGHTS', ARGV[2])
  redis.call('SET', KEYS[2], ARGV[1])
end
return 1
"""


@dataclass(frozen=True, slots=True)
class KeyLayout:
    prefix: str

    def user(self, user_id: str) -> str:
        return f"{self.prefix}:user:{{{user_id}}}"

    @property
    def popularity(self) -> str:
        return f"{self.prefix}:popularity"

    @property
    def popularity_epoch(self) -> str:
        return f"{self.prefix}:popularity:epoch_ms"

    @property
    def online(self) -> str:
        return f"{self.prefix}:online"


@dataclass(slots=True)
class StoredUser:
    state: UserState
    vector: bytes | None = None
    memory: bytes | None = None
    model_version: str | None = None
    updated_ms: int | None = None
    recs: list[str] | None = None


@dataclass(slots=True)
class BatchRead:
    users: dict[str, StoredUser]
    popular: list[tuple[str, float]]  # best first
    popularity_epoch_ms: int | None


@dataclass(slots=True)
class UserWrite:
    state: UserState
    vector: bytes | None = None
    memory: bytes | None = None
    model_version: str | None = None
    recs: list[str] | None = None


_USER_FIELDS = ("window", "offsets", "vector", "memory", "model_version", "updated_ms", "recs")


def _decode_user(values: list[bytes | None]) -> StoredUser:
    window_raw, offsets_raw, vector, memory, version, updated, recs = values
    window = [WindowEntry.from_json(e) for e in json.loads(window_raw)] if window_raw else []
    offsets = json.loads(offsets_raw) if offsets_raw else {}
    return StoredUser(
        state=UserState(window=window, offsets=offsets),
        vector=vector,
        memory=memory,
        model_version=version.decode() if version else None,
        updated_ms=int(updated) if updated else None,
        recs=json.loads(recs) if recs else None,
    )


def encode_window(window: Iterable[WindowEntry]) -> str:
    return json.dumps([entry.to_json() for entry in window], separators=(",", ":"))


def connect(settings: Settings) -> aioredis.Redis:
    options: dict[str, object] = {"username": settings.redis_username}
    if settings.redis_password:
        options["password"] = settings.redis_password.get_secret_value()
    if settings.redis_ssl_ca_certs:  # TLS itself is chosen by a rediss:// URL
        options["ssl_ca_certs"] = str(settings.redis_ssl_ca_certs)
    return aioredis.Redis.from_url(settings.redis_url, **options)


class StateStore:
    """Per-user windows, vectors and shared popularity in Redis."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.client = client
        self.keys = KeyLayout(settings.redis_key_prefix)
        self.ttl_ms = settings.state_ttl_seconds * 1000
        self.half_life_ms = settings.popularity_half_life_seconds * 1000
        self._rebase = client.register_script(_REBASE_SCRIPT)

    async def read_batch(self, user_ids: Iterable[str], popular_n: int) -> BatchRead:
        """One round trip: every user's hash plus the current popular items."""
        ids = list(dict.fromkeys(user_ids))
        pipe = self.client.pipeline(transaction=False)
        for user_id in ids:
            pipe.hmget(self.keys.user(user_id), _USER_FIELDS)
        pipe.zrevrange(self.keys.popularity, 0, popular_n - 1, withscores=True)
        pipe.get(self.keys.popularity_epoch)
        results = await pipe.execute()
        users = {
            user_id: _decode_user(values) for user_id, values in zip(ids, results, strict=False)
        }
        popular = [(item.decode(), float(score)) for item, score in results[len(ids)]]
        epoch = results[len(ids) + 1]
        return BatchRead(users, popular, int(epoch) if epoch else None)

    async def write_batch(
        self,
        writes: Mapping[str, UserWrite],
        item_timestamps: Iterable[tuple[str, int]],
        popularity_epoch_ms: int | None,
        online: Mapping[str, int] | None = None,
    ) -> None:
        """One MULTI/EXEC: all users' new state, popularity increments of new events and the
        online hit-rate counters (`online`: field -> increment)."""
        item_timestamps = list(item_timestamps)
        epoch = popularity_epoch_ms
        if epoch is None and item_timestamps:
            epoch = min(ts for _, ts in item_timestamps)
        if epoch is not None and item_timestamps:
            newest = max(ts for _, ts in item_timestamps)
            half_lives = (newest - epoch) / self.half_life_ms
            if half_lives > REBASE_AFTER_HALF_LIVES:
                epoch = await self._rebase_popularity(epoch, half_lives)
        now_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=True)
        for user_id, write in writes.items():
            key = self.keys.user(user_id)
            mapping: dict[str, str | bytes | int] = {
                "window": encode_window(write.state.window),
                "offsets": json.dumps(write.state.offsets, separators=(",", ":")),
                "updated_ms": now_ms,
            }
            if write.vector is not None:
                mapping["vector"] = write.vector
                mapping["model_version"] = write.model_version or ""
            if write.memory is not None:
                mapping["memory"] = write.memory
            if write.recs is not None:
                mapping["recs"] = json.dumps(write.recs, separators=(",", ":"))
            pipe.hset(key, mapping=mapping)
            if self.ttl_ms:
                pipe.pexpire(key, self.ttl_ms)
        if epoch is not None and item_timestamps:
            pipe.set(self.keys.popularity_epoch, epoch, nx=True)
            increments: dict[str, float] = {}
            for item_id, ts in item_timestamps:
                weight = self.popularity_weight(ts, epoch)
                increments[item_id] = increments.get(item_id, 0.0) + weight
            for item_id, weight in increments.items():
                pipe.zincrby(self.keys.popularity, weight, item_id)
        for name, increment in (online or {}).items():
            pipe.hincrby(self.keys.online, name, increment)
        await pipe.execute()

    def popularity_weight(self, timestamp_ms: int, epoch_ms: int) -> float:
        return math.pow(2.0, (timestamp_ms - epoch_ms) / self.half_life_ms)

    def merge_popularity(
        self,
        popular: list[tuple[str, float]],
        item_timestamps: list[tuple[str, int]],
        epoch_ms: int | None,
    ) -> list[tuple[str, float]]:
        """The stored ranking plus this batch's not-yet-written events, best first.

        Only used to rank; what is written is computed again in `write_batch`.
        """
        if not item_timestamps:
            return popular
        if epoch_ms is None:
            epoch_ms = min(ts for _, ts in item_timestamps)
        scores = dict(popular)
        for item_id, ts in item_timestamps:
            scores[item_id] = scores.get(item_id, 0.0) + self.popularity_weight(ts, epoch_ms)
        return sorted(scores.items(), key=lambda pair: pair[1], reverse=True)

    async def _rebase_popularity(self, epoch: int, half_lives: float) -> int:
        shift = math.floor(half_lives) - 1
        new_epoch = int(epoch + shift * self.half_life_ms)
        await self._rebase(
            keys=[self.keys.popularity, self.keys.popularity_epoch],
            args=[new_epoch, repr(math.pow(2.0, -shift))],
        )
        return new_epoch

    async def online_counters(self) -> dict[str, int]:
        raw = await self.client.hgetall(self.keys.online)
        return {name.decode(): int(value) for name, value in raw.items()}

    async def read_user(self, user_id: str) -> StoredUser | None:
        values = await self.client.hmget(self.keys.user(user_id), _USER_FIELDS)
        if all(value is None for value in values):
            return None
        return _decode_user(values)
