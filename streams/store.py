"""Redis state: one small interface, two commands per micro-batch (a read script, a write script).

Key layout (pinned by tests/streams/test_store.py; change it only with a migration):

    {prefix}:user:{<user_id>}          hash, one per user
        offsets       JSON {"topic/partition": highest offset applied}, the replay guard
        updated_ms    wall-clock time of the last write
        vector        float32 little-endian bytes, the interest vector (encoder only)
        memory        float32 bytes, the encoder's long-term memory after the newest event
        model_version the bundle version that produced `vector` and `memory`
        recs          JSON list of the item ids last recommended (for online hit rate)
    {prefix}:window:{<user_id>}        list, the rolling window, oldest first; each element a
                                       JSON {event_id, item_id, event_type, timestamp}
    {prefix}:popularity                zset item_id -> exponentially decayed event count
    {prefix}:popularity:epoch_ms       reference time of the popularity weights
    {prefix}:online                    hash: "events:<version>", "hits:<version>" counters of
                                       events that were in the recommendation made before them
    Both per-user keys expire after state_ttl_seconds without events.

The braces around the user id are a Redis Cluster hash tag: everything about one user lives in
one slot. The write for a batch is one Lua script: Redis runs it without interleaving other
commands, so a worker crash leaves either the whole batch or none of it, and with the `offsets`
guard a replayed batch changes nothing. The script first checks that every user's `offsets` (and
the popularity epoch) are still what the batch read and writes nothing otherwise: two workers
that both think they own a user (a zombie during a rebalance) cannot interleave their writes.

Why scripts and a list: with a hash per user written field by field, a batch of 500 events cost
thousands of commands, and re-encoding every touched window (up to 200 entries each) dominated
the worker. Now windows only grow by RPUSH of the new entries (LTRIM drops the oldest), and the
worker keeps each user as it last read or wrote it in memory: a batch's read sends the `offsets`
it holds per user and gets back `false` for each user nobody else wrote since (every write
changes them), and the user's hash and window only where another worker, or a restart, applied
events since.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import msgpack
import msgspec
import orjson
import redis.asyncio as aioredis
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

from streams.settings import Settings
from streams.window import UserState, WindowEntry

# Popularity weights are 2 ** ((t - epoch) / half_life); rebase before they leave float range.
REBASE_AFTER_HALF_LIVES = 256
MAX_WEIGHT_EXPONENT = 1000.0
MAX_CLOCK_SKEW_MS = 3_600_000

# KEYS: popularity, epoch. ARGV: new epoch, half-life ms. The scale comes from the stored
# epoch, so two workers rebasing at once cannot scale twice.
_REBASE_SCRIPT = """
local current = tonumber(redis.call('GET', KEYS[2]))
local target = tonumber(ARGV[1])
if current and current < target then
  local factor = 2 ^ ((current - target) / tonumber(ARGV[2]))
  redis.call('ZUNIONSTORE', KEYS[1], 1, KEYS[1], 'WEIGHTS', tostring(factor))
  redis.call('SET', KEYS[2], ARGV[1])
end
return 1
"""

# KEYS: popularity, epoch, then (user hash, window list) per user.
# ARGV: popular_n, then per user the offsets JSON this worker last wrote ("" if none).
# Returns {popular (flat item, score), epoch, per user false or {offsets, vector, memory,
# version, recs, window}}: false where the offsets are the ones in ARGV (the worker's copy of
# the user is current: nothing else has written it since), everything else on a cache miss.
_READ_SCRIPT = """
local out = {}
out[1] = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
out[2] = redis.call('GET', KEYS[2])
for u = 1, (#KEYS - 2) / 2 do
  local hash, list = KEYS[2 * u + 1], KEYS[2 * u + 2]
  local offsets = redis.call('HGET', hash, 'offsets')
  if offsets and offsets == ARGV[u + 1] then
    out[u + 2] = false
  else
    local row = redis.call('HMGET', hash, 'vector', 'memory', 'model_version', 'recs')
    out[u + 2] = {offsets or false, row[1], row[2], row[3], row[4],
                  redis.call('LRANGE', list, 0, -1)}
  end
end
return out
"""

# KEYS: popularity, epoch, online, then (user hash, window list) per user.
# ARGV: ttl_ms, now_ms, epoch the weights are relative to ("" = none), n_items, n_online,
# item/weight pairs, online name/increment pairs, then the users: one MessagePack array with,
# per user in KEYS order, an array of 9 values: the offsets JSON read before the batch
# ("" = none), mode ("append" or "replace"), the new window entries (an array of JSON
# strings), window length after the batch, offsets, vector ("" = unchanged), memory,
# model_version, recs ("" = unchanged). Why one argument: packing ~9 arguments per user into
# the command was ~8% of the worker's GIL time under load (py-spy); MessagePack of the
# same values is one C call, and Redis's Lua unpacks it (cmsgpack, no bin type: strings).
# Compare-and-set: if the popularity epoch or any user's offsets changed since the read (another
# worker wrote), nothing is written and the script returns 0; the caller retries the batch.
_WRITE_SCRIPT = """
local ttl, now = tonumber(ARGV[1]), ARGV[2]
local n_items, n_online = tonumber(ARGV[4]), tonumber(ARGV[5])
local users = cmsgpack.unpack(ARGV[6 + 2 * n_items + 2 * n_online])
local epoch = redis.call('GET', KEYS[2])
if n_items > 0 and epoch and epoch ~= ARGV[3] then return 0 end
for u = 1, #users do
  local stored = redis.call('HGET', KEYS[2 * u + 2], 'offsets')
  if (stored or '') ~= users[u][1] then return 0 end
end
local a = 6
if n_items > 0 then
  if not epoch then redis.call('SET', KEYS[2], ARGV[3]) end
  for i = 1, n_items do
    redis.call('ZINCRBY', KEYS[1], ARGV[a + 1], ARGV[a])
    a = a + 2
  end
end
for i = 1, n_online do
  redis.call('HINCRBY', KEYS[3], ARGV[a], ARGV[a + 1])
  a = a + 2
end
for u = 1, #users do
  local hash, list, user = KEYS[2 * u + 2], KEYS[2 * u + 3], users[u]
  if user[2] == 'replace' then redis.call('DEL', list) end
  local entries = user[3]
  local length = -1  -- unknown
  for i = 1, #entries, 1000 do  -- unpack() fails past ~8000 values
    length = redis.call('RPUSH', list, unpack(entries, i, math.min(i + 999, #entries)))
  end
  local keep = user[4]
  if keep <= 0 then
    redis.call('DEL', list)
  elseif length < 0 or length > keep then
    redis.call('LTRIM', list, -keep, -1)
  end
  -- One HSET per user: each redis.call costs the script more than the command itself.
  local fields = {'offsets', user[5], 'updated_ms', now}
  if user[6] ~= '' then
    fields[5], fields[6] = 'vector', user[6]
    fields[7], fields[8] = 'memory', user[7]
    fields[9], fields[10] = 'model_version', user[8]
  end
  if user[9] ~= '' then
    fields[#fields + 1] = 'recs'
    fields[#fields + 1] = user[9]
  end
  redis.call('HSET', hash, unpack(fields))
  if ttl > 0 then
    redis.call('PEXPIRE', hash, ttl)
    if keep > 0 then redis.call('PEXPIRE', list, ttl) end
  end
end
return 1
"""


def popularity_epoch(
    epoch_ms: int | None, item_timestamps: Sequence[tuple[str, int]]
) -> int | None:
    """The epoch popularity weights are relative to: the stored one, else (the first write)
    the oldest new event's time; None while there is neither."""
    if epoch_ms is not None or not item_timestamps:
        return epoch_ms
    return min(ts for _, ts in item_timestamps)


def _latest_event_time() -> int:
    """The newest event time popularity believes: now, plus a clock-skew allowance."""
    return int(time.time() * 1000) + MAX_CLOCK_SKEW_MS


class StaleStateError(Exception):
    """Another writer changed a user's state or the popularity epoch since this batch read it."""


@dataclass(frozen=True, slots=True)
class KeyLayout:
    prefix: str

    def user(self, user_id: str) -> str:
        return f"{self.prefix}:user:{{{user_id}}}"

    def window(self, user_id: str) -> str:
        return f"{self.prefix}:window:{{{user_id}}}"

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
    raw_offsets: bytes | None = None  # as stored, for the write's compare-and-set
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
    state: UserState  # after the batch
    read_offsets: bytes | None = None  # `offsets` exactly as read before the batch (the CAS)
    offsets_json: bytes | None = None  # encode_offsets(state.offsets), if the caller has it
    # Entries appended at the end of the window by this batch; `replace` rewrites the whole
    # window instead (an event was inserted out of time order).
    new_entries: Sequence[WindowEntry] = ()
    replace: bool = False
    vector: bytes | None = None
    memory: bytes | None = None
    model_version: str | None = None
    recs: list[str] | None = None


_entry_encoder = msgspec.json.Encoder()
_window_decoder = msgspec.json.Decoder(list[WindowEntry])


def encode_entry(entry: WindowEntry) -> bytes:
    return _entry_encoder.encode(entry)


def decode_window(entries: Sequence[bytes]) -> list[WindowEntry]:
    """Window entries as stored (one JSON object each), oldest first, in one decoder call."""
    return _window_decoder.decode(b"[" + b",".join(entries) + b"]")


def encode_offsets(offsets: Mapping[str, int]) -> bytes:
    return orjson.dumps(dict(sorted(offsets.items())))


def _pack_for_lua(value: object) -> bytes:
    """MessagePack as Redis's Lua cmsgpack reads it: it predates the bin type, so bytes go as
    (raw) strings, which Lua strings hold byte for byte."""
    return msgpack.packb(value, use_bin_type=False)


def _text(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


def _decode_row(row: list) -> _CachedUser:  # type: ignore[type-arg]
    """A user as the read script returns it on a cache miss."""
    offsets_raw, vector, memory, version, recs, window_raw = row
    return _CachedUser(
        raw_offsets=offsets_raw or b"",
        state=UserState(
            decode_window(window_raw), orjson.loads(offsets_raw) if offsets_raw else {}
        ),
        vector=vector,
        memory=memory,
        model_version=_text(version),
        recs=orjson.loads(recs) if recs else None,
    )


class HiredisPacking:
    """Mixin for a redis.asyncio connection class: build commands with hiredis, in C.

    Why: redis-py's asyncio connections pack commands in Python, and a batch's write script
    carries ~9 arguments per user: packing a 500-user call is ~2.9x faster in hiredis, same
    bytes (bench/redis_pack.py). The packer is redis-py's own, the one its sync connections use
    when hiredis is installed; tests/streams/test_store.py compares it byte for byte with the
    asyncio one.
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


def connect(settings: Settings) -> aioredis.Redis:
    options: dict[str, object] = {"username": settings.redis_username}
    if settings.redis_password:
        options["password"] = settings.redis_password.get_secret_value()
    if settings.redis_ssl_ca_certs:  # TLS itself is chosen by a rediss:// URL
        options["ssl_ca_certs"] = str(settings.redis_ssl_ca_certs)
    return with_hiredis_packing(aioredis.Redis.from_url(settings.redis_url, **options))


@dataclass(slots=True)
class _CachedUser:
    """A user as this worker last read or wrote it: what Redis holds while ``raw_offsets``
    is still the stored ``offsets`` (every write changes them)."""

    raw_offsets: bytes
    state: UserState
    vector: bytes | None
    memory: bytes | None
    model_version: str | None
    recs: list[str] | None

    def stored(self) -> StoredUser:
        """The user for a batch, with a state of its own (the batch changes it and may fail
        before writing)."""
        return StoredUser(
            self.state.copy(),
            raw_offsets=self.raw_offsets,
            vector=self.vector,
            memory=self.memory,
            model_version=self.model_version,
            recs=self.recs,
        )


@dataclass(slots=True)
class _UserCache:
    """Users this worker last read or wrote, LRU, keyed by user id.

    Why: a batch's read then sends Redis only the offsets each user is cached with, and gets
    back one ``false`` per user nothing else wrote since, instead of the user's hash and window
    to decode again (a worker that owns its partitions hits nearly always).
    """

    max_users: int
    entries: OrderedDict[str, _CachedUser] = field(default_factory=OrderedDict)

    def peek(self, user_id: str) -> _CachedUser | None:
        return self.entries.get(user_id)

    def touch(self, user_id: str) -> None:
        if user_id in self.entries:
            self.entries.move_to_end(user_id)

    def put(self, user_id: str, entry: _CachedUser) -> None:
        # Not copied: what is put is not changed again (`_CachedUser.stored` hands out
        # copies).
        self.entries[user_id] = entry
        self.entries.move_to_end(user_id)
        while len(self.entries) > self.max_users:
            self.entries.popitem(last=False)

    def after_write(self, user_id: str, offsets: bytes, write: UserWrite) -> None:
        """Cache the user as ``write`` leaves it. Fields the write leaves unchanged come from
        the cached copy the batch read; without one the user is dropped (read afresh)."""
        prior = self.entries.pop(user_id, None)
        if prior is not None and prior.raw_offsets != (write.read_offsets or b""):
            prior = None
        keeps_model = write.vector is None
        if (keeps_model or write.recs is None) and prior is None:
            return
        model = prior if keeps_model else write
        assert model is not None
        self.put(
            user_id,
            _CachedUser(
                offsets,
                write.state,
                model.vector,
                model.memory,
                model.model_version,
                prior.recs if write.recs is None and prior is not None else write.recs,
            ),
        )


class StateStore:
    """Per-user windows, vectors and shared popularity in Redis."""

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.client = client
        self.keys = KeyLayout(settings.redis_key_prefix)
        self.ttl_ms = settings.state_ttl_seconds * 1000
        self.half_life_ms = settings.popularity_half_life_seconds * 1000
        self._rebase = client.register_script(_REBASE_SCRIPT)
        self._read = client.register_script(_READ_SCRIPT)
        self._write = client.register_script(_WRITE_SCRIPT)
        self._cache = _UserCache(settings.window_cache_users)

    async def read_batch(self, user_ids: Iterable[str], popular_n: int) -> BatchRead:
        """One command: every user's state plus the current popular items."""
        ids = list(dict.fromkeys(user_ids))
        keys = [self.keys.popularity, self.keys.popularity_epoch]
        for user_id in ids:
            keys += [self.keys.user(user_id), self.keys.window(user_id)]
        cache = self._cache
        # The copies the offsets are sent for, kept here: while the script runs, a commit of
        # the batch before (or a put below) may evict them from the cache, and a `false`
        # answer is about these copies (cached entries are never changed, only replaced).
        held = [cache.peek(user_id) for user_id in ids]
        args = [popular_n, *(entry.raw_offsets if entry else b"" for entry in held)]
        result = await self._read(keys=keys, args=args)
        flat, epoch = result[0], result[1]
        popular = [(flat[i].decode(), float(flat[i + 1])) for i in range(0, len(flat), 2)]
        users: dict[str, StoredUser] = {}
        for user_id, entry, row in zip(ids, held, result[2:], strict=True):
            if row is None:  # Lua false: the copy held is current (only sent offsets match)
                assert entry is not None
                cache.touch(user_id)
            else:
                entry = _decode_row(row)
                cache.put(user_id, entry)
            users[user_id] = entry.stored()
        return BatchRead(users, popular, int(epoch) if epoch else None)

    def popularity_weights(
        self, item_timestamps: Iterable[tuple[str, int]], epoch_ms: int
    ) -> Iterator[tuple[str, float]]:
        """(item, weight) of each event: 2 ** ((event time - epoch) / half-life).

        Event times are capped at the wall clock (plus a skew allowance): one event stamped
        next year (a client clock bug) must not make everything else weightless. The exponent
        is bounded too: an event far from the epoch must not overflow a float.
        """
        latest = _latest_event_time()  # once per batch: time.time() per event showed up
        half_life = self.half_life_ms
        for item_id, ts in item_timestamps:
            exponent = (min(ts, latest) - epoch_ms) / half_life
            yield item_id, math.pow(2.0, min(exponent, MAX_WEIGHT_EXPONENT))

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
        epoch = popularity_epoch(epoch_ms, item_timestamps)
        assert epoch is not None  # there are events
        scores = dict(popular)
        for item_id, weight in self.popularity_weights(item_timestamps, epoch):
            scores[item_id] = scores.get(item_id, 0.0) + weight
        return sorted(scores.items(), key=lambda pair: pair[1], reverse=True)

    async def write_batch(
        self,
        writes: Mapping[str, UserWrite],
        item_timestamps: Iterable[tuple[str, int]],
        popularity_epoch_ms: int | None,
        online: Mapping[str, int] | None = None,
    ) -> None:
        """One atomic script: all users' new state, popularity increments of new events and
        the online hit-rate counters (`online`: field -> increment)."""
        item_timestamps = list(item_timestamps)
        epoch = popularity_epoch(popularity_epoch_ms, item_timestamps)
        if epoch is not None and item_timestamps:
            newest = min(max(ts for _, ts in item_timestamps), _latest_event_time())
            half_lives = (newest - epoch) / self.half_life_ms
            if half_lives > REBASE_AFTER_HALF_LIVES:
                epoch = await self._rebase_popularity(epoch, half_lives)
        increments: dict[str, float] = {}
        if epoch is not None:
            for item_id, weight in self.popularity_weights(item_timestamps, epoch):
                increments[item_id] = increments.get(item_id, 0.0) + weight
        online = dict(online or {})
        keys = [self.keys.popularity, self.keys.popularity_epoch, self.keys.online]
        args: list[bytes | str | int | float] = [
            self.ttl_ms,
            int(time.time() * 1000),
            "" if epoch is None else epoch,
            len(increments),
            len(online),
        ]
        for item_id, weight in increments.items():
            args += [item_id, repr(weight)]
        for name, increment in online.items():
            args += [name, increment]
        signatures: dict[str, bytes] = {}
        users: list[tuple[bytes, str, list[bytes], int, bytes, bytes, bytes, str, bytes]] = []
        for user_id, write in writes.items():
            keys += [self.keys.user(user_id), self.keys.window(user_id)]
            entries = write.state.window if write.replace else write.new_entries
            offsets = write.offsets_json or encode_offsets(write.state.offsets)
            signatures[user_id] = offsets
            users.append(
                (
                    write.read_offsets or b"",
                    "replace" if write.replace else "append",
                    [encode_entry(entry) for entry in entries],
                    len(write.state.window),
                    offsets,
                    write.vector if write.vector is not None else b"",
                    write.memory if write.memory is not None else b"",
                    write.model_version or "",
                    orjson.dumps(write.recs) if write.recs is not None else b"",
                )
            )
        args.append(_pack_for_lua(users))
        if not await self._write(keys=keys, args=args):
            raise StaleStateError("state changed since this batch read it; retrying the batch")
        for user_id, write in writes.items():
            self._cache.after_write(user_id, signatures[user_id], write)

    async def _rebase_popularity(self, epoch: int, half_lives: float) -> int:
        shift = math.floor(half_lives) - 1
        new_epoch = int(epoch + shift * self.half_life_ms)
        await self._rebase(
            keys=[self.keys.popularity, self.keys.popularity_epoch],
            args=[new_epoch, repr(self.half_life_ms)],
        )
        return new_epoch

    async def online_counters(self) -> dict[str, int]:
        raw = await self.client.hgetall(self.keys.online)
        return {name.decode(): int(value) for name, value in raw.items()}

    async def read_user(self, user_id: str) -> StoredUser | None:
        """A fresh read (no cache), for `interest inspect`."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(
            self.keys.user(user_id),
            ["offsets", "vector", "memory", "model_version", "recs", "updated_ms"],
        )
        pipe.lrange(self.keys.window(user_id), 0, -1)
        fields, window = await pipe.execute()
        if all(value is None for value in fields) and not window:
            return None
        return self._decode_fresh(fields, window)

    def _decode_fresh(self, fields: list, window: list) -> StoredUser:  # type: ignore[type-arg]
        offsets_raw, vector, memory, version, recs, updated = fields
        return StoredUser(
            state=UserState(
                decode_window(window),
                orjson.loads(offsets_raw) if offsets_raw else {},
            ),
            vector=vector,
            memory=memory,
            model_version=_text(version),
            updated_ms=int(updated) if updated else None,
            recs=orjson.loads(recs) if recs else None,
        )
