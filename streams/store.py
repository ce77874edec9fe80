"""Redis state: one small interface, a read and a write per micro-batch, on one Redis or on
Redis Cluster.

Key layout (pinned by tests/streams/test_store.py; change it only with a migration):

    {prefix}:user:{<user_id>}          hash, one per user
        offsets       JSON {"topic/partition": highest offset applied}, the replay guard
        updated_ms    wall-clock time of the last write
        vector        float32 little-endian bytes, the interest vector (encoder only)
        memory        float32 bytes, the encoder's long-term memory after the newest event
        model_version the bundle version that produced `vector` and `memory`
        recs          JSON list of the item ids last recommended (for online hit rate)
        forget        JSON {"pending": [[forget_id, [topic, ...]], ...], "done": [ids]}: the
                      user's forget requests (streams/window.py ForgetMark); absent if none
    {prefix}:window:{<user_id>}        list, the rolling window, oldest first; each element a
                                       JSON {event_id, item_id, event_type, timestamp}
    {prefix}:popularity                zset item_id -> exponentially decayed event count
    {prefix}:popularity:epoch_ms       reference time of the popularity weights
    {prefix}:online                    hash: "events:<version>", "hits:<version>" counters of
                                       events that were in the recommendation made before them
    {prefix}:counted                   Redis Cluster only: hash "topic/partition" -> highest
                                       input offset counted into popularity and online
    Both per-user keys expire after state_ttl_seconds without events. On Redis Cluster the four
    shared keys are {prefix}:{shared}:popularity and so on: one hash tag puts them in one slot.

The braces around the user id are a Redis Cluster hash tag: everything about one user lives in
one slot. The write for a batch is one Lua script: Redis runs it without interleaving other
commands, so a worker crash leaves either the whole batch or none of it, and with the `offsets`
guard a replayed batch changes nothing. The script first checks that every user's `offsets` (and
the popularity epoch) are still what the batch read and writes nothing otherwise: two workers
that both think they own a user (a zombie during a rebalance) cannot interleave their writes.

Why scripts and a list: a hash per user written field by field costs thousands of commands
per batch, and re-encoding every touched window (up to 200 entries each) would dominate the
worker. Windows only grow by RPUSH of the new entries (LTRIM drops the oldest), and the
worker keeps each user as it last read or wrote it in memory: a batch's read sends the `offsets`
it holds per user and gets back `false` for each user nobody else wrote since (every write
changes them), and the user's hash and window only where another worker, or a restart, applied
events since.

On Redis Cluster a script reaches one slot, so the batch becomes one script per user (atomic
per user, same compare-and-set) plus one for the shared counters, which counts each input event
once: streams/cluster_io.py says how, and streams/store_io.py holds the one-Redis commands.

Where the parts live: the scripts in streams/lua/ (each with its KEYS/ARGV contract at the top),
the popularity weights in streams/popularity.py, the per-user cache in streams/user_cache.py,
the client in streams/redis_client.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from streams.cluster_io import ClusterScripts
from streams.events import Source
from streams.popularity import Decay, popularity_epoch
from streams.settings import Settings
from streams.store_io import BatchScripts, Keys, SharedWrite, StoreIO
from streams.user_cache import CachedUser, UserCache
from streams.window import ForgetMark, UserState, WindowEntry


class StaleStateError(Exception):
    """Another writer changed a user's state or the popularity epoch since this batch read it."""


@dataclass(frozen=True, slots=True)
class KeyLayout:
    prefix: str
    # On Redis Cluster the shared keys carry one hash tag, so one script reaches them all.
    cluster: bool = False

    def user(self, user_id: str) -> str:
        return f"{self.prefix}:user:{{{user_id}}}"

    def window(self, user_id: str) -> str:
        return f"{self.prefix}:window:{{{user_id}}}"

    @property
    def shared_prefix(self) -> str:
        return f"{self.prefix}:{{shared}}" if self.cluster else self.prefix

    @property
    def popularity(self) -> str:
        return f"{self.shared_prefix}:popularity"

    @property
    def popularity_epoch(self) -> str:
        return f"{self.shared_prefix}:popularity:epoch_ms"

    @property
    def online(self) -> str:
        return f"{self.shared_prefix}:online"

    @property
    def counted(self) -> str:
        return f"{self.shared_prefix}:counted"

    def io_keys(self) -> Keys:
        return Keys(self.popularity, self.popularity_epoch, self.online, self.counted)


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
    # A forget request wiped the user in this batch: the stored model state and last
    # recommendation go (what the batch wrote after the forget replaces them).
    wipe: bool = False
    mark_changed: bool = False  # `state.forgetting` is written (set, or deleted when None)


_entry_encoder = msgspec.json.Encoder()
_window_decoder = msgspec.json.Decoder(list[WindowEntry])


def encode_entry(entry: WindowEntry) -> bytes:
    return _entry_encoder.encode(entry)


def decode_window(entries: Sequence[bytes]) -> list[WindowEntry]:
    """Window entries as stored (one JSON object each), oldest first, in one decoder call."""
    return _window_decoder.decode(b"[" + b",".join(entries) + b"]")


def encode_offsets(offsets: Mapping[str, int]) -> bytes:
    return orjson.dumps(dict(sorted(offsets.items())))


# The prior signature of a user a forget request wiped: no cached state matches it.
FORGOTTEN = b"\x00forgotten"
_mark_encoder = msgspec.json.Encoder()
_mark_decoder = msgspec.json.Decoder(ForgetMark)


def decode_mark(raw: bytes | None) -> ForgetMark | None:
    return _mark_decoder.decode(raw) if raw else None


def _mark_arg(write: UserWrite) -> bytes | str:
    """The write script's forget-mark argument: "" unchanged, "-" delete, else the mark."""
    if not write.mark_changed:
        return ""
    mark = write.state.forgetting
    return "-" if mark is None else _mark_encoder.encode(mark)


def _text(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


def _decode_state(window: list, offsets_raw: bytes | None, mark: bytes | None) -> UserState:  # type: ignore[type-arg]
    """A user's window, offsets and forget mark as Redis holds them."""
    offsets = orjson.loads(offsets_raw) if offsets_raw else {}
    return UserState(decode_window(window), offsets, forgetting=decode_mark(mark))


def _decode_row(row: list) -> CachedUser:  # type: ignore[type-arg]
    """A user as the read script returns it on a cache miss."""
    offsets_raw, vector, memory, version, recs, window_raw, mark = row
    return CachedUser(
        offsets_raw or b"",
        _decode_state(window_raw, offsets_raw, mark),
        vector,
        memory,
        _text(version),
        orjson.loads(recs) if recs else None,
    )


def _decode_fresh(fields: list, window: list) -> StoredUser:  # type: ignore[type-arg]
    """A user as `read_user`'s HMGET and LRANGE return it."""
    offsets_raw, vector, memory, version, recs, updated, mark = fields
    return StoredUser(
        _decode_state(window, offsets_raw, mark),
        vector=vector,
        memory=memory,
        model_version=_text(version),
        updated_ms=int(updated) if updated else None,
        recs=orjson.loads(recs) if recs else None,
    )


def _for_batch(entry: CachedUser) -> StoredUser:
    """A cached user for a batch, with a state of its own (the batch changes it and may fail
    before writing)."""
    return StoredUser(
        entry.state.copy(),
        raw_offsets=entry.raw_offsets,
        vector=entry.vector,
        memory=entry.memory,
        model_version=entry.model_version,
        recs=entry.recs,
    )


def _source_key(source: Source) -> str:
    return f"{source.topic}/{source.partition}"  # as in the users' offsets JSON


def _online_events(events: Sequence[tuple[Source, str, bool]]) -> list[tuple[str, int, str, int]]:
    """(partition, offset, counter, increment): each online event's two counters."""
    out = []
    for source, version, hit in events:
        key, offset = _source_key(source), source.offset
        out += [(key, offset, f"events:{version}", 1), (key, offset, f"hits:{version}", int(hit))]
    return out


def _user_values(write: UserWrite, offsets: bytes) -> tuple[Any, ...]:
    """The 11 values of one user's write (streams/lua/write.lua)."""
    entries = write.state.window if write.replace else write.new_entries
    return (
        write.read_offsets or b"",
        "replace" if write.replace else "append",
        [encode_entry(entry) for entry in entries],
        len(write.state.window),
        offsets,
        write.vector if write.vector is not None else b"",
        write.memory if write.memory is not None else b"",
        write.model_version or "",
        orjson.dumps(write.recs) if write.recs is not None else b"",
        "1" if write.wipe else "",
        _mark_arg(write),
    )


class StateStore:
    """Per-user windows, vectors and shared popularity in Redis: one Redis (`BatchScripts`)
    or Redis Cluster (`ClusterScripts`), chosen by the client it is given."""

    def __init__(self, client: aioredis.Redis | RedisCluster, settings: Settings) -> None:
        self.client = client
        cluster = isinstance(client, RedisCluster)
        self.keys = KeyLayout(settings.redis_key_prefix, cluster=cluster)
        self.ttl_ms = settings.state_ttl_seconds * 1000
        self._decay = Decay(settings.popularity_half_life_seconds * 1000)
        keys = self.keys.io_keys()
        self._io: StoreIO = ClusterScripts(client, keys) if cluster else BatchScripts(client, keys)
        self._cache = UserCache(settings.window_cache_users)

    def _user_keys(self, user_ids: Iterable[str]) -> list[tuple[str, str]]:
        return [(self.keys.user(u), self.keys.window(u)) for u in user_ids]

    async def read_batch(self, user_ids: Iterable[str], popular_n: int) -> BatchRead:
        """Every user's state plus the current popular items (one command on one Redis)."""
        ids = list(dict.fromkeys(user_ids))
        cache = self._cache
        # The copies the offsets are sent for, kept here: while the read runs, a commit of
        # the batch before (or a put below) may evict them from the cache, and a `false`
        # answer is about these copies (cached entries are never changed, only replaced).
        held = [cache.peek(user_id) for user_id in ids]
        offsets = [entry.raw_offsets if entry else b"" for entry in held]
        flat, epoch, rows = await self._io.read(self._user_keys(ids), offsets, popular_n)
        popular = [(flat[i].decode(), float(flat[i + 1])) for i in range(0, len(flat), 2)]
        users: dict[str, StoredUser] = {}
        for user_id, entry, row in zip(ids, held, rows, strict=True):
            if row is None:  # the copy held is current (only sent offsets match)
                assert entry is not None
                cache.touch(user_id)
            else:
                entry = _decode_row(row)
                cache.put(user_id, entry)
            users[user_id] = _for_batch(entry)
        return BatchRead(users, popular, int(epoch) if epoch else None)

    def merge_popularity(
        self,
        popular: list[tuple[str, float]],
        item_timestamps: list[tuple[str, int]],
        epoch_ms: int | None,
    ) -> list[tuple[str, float]]:
        """The stored ranking plus this batch's not-yet-written events, best first, weighed as
        `write_batch` will weigh them. Only used to rank."""
        return self._decay.merge(popular, item_timestamps, epoch_ms)

    async def write_batch(
        self,
        writes: Mapping[str, UserWrite],
        item_timestamps: Iterable[tuple[str, int]],
        popularity_epoch_ms: int | None,
        online: Mapping[str, int] | None = None,
        item_sources: Sequence[Source] = (),
        online_events: Sequence[tuple[Source, str, bool]] = (),
    ) -> None:
        """All users' new state, popularity increments of new events and the online hit-rate
        counters (`online`: field -> increment): one atomic script on one Redis, atomic per
        user on Redis Cluster. ``item_sources`` (one per item timestamp) and
        ``online_events`` (source, model version, hit) say where each count came from: Redis
        Cluster counts each input event once with them."""
        item_timestamps = list(item_timestamps)
        epoch = popularity_epoch(popularity_epoch_ms, item_timestamps)
        if epoch is not None:
            epoch = await self._rebase_if_due(epoch, item_timestamps)
        increments = {} if epoch is None else self._decay.increments(item_timestamps, epoch)
        per_event = self._io.per_event  # only Redis Cluster reads the event-by-event lists
        shared = SharedWrite(
            epoch,
            increments,
            dict(online or {}),
            self._item_events(epoch, item_timestamps, item_sources) if per_event else [],
            _online_events(online_events) if per_event else [],
        )
        signatures: dict[str, bytes] = {}
        users: list[tuple[Any, ...]] = []
        for user_id, write in writes.items():
            offsets = write.offsets_json or encode_offsets(write.state.offsets)
            signatures[user_id] = offsets
            users.append(_user_values(write, offsets))
        now_ms = int(time.time() * 1000)
        if not await self._io.write(shared, self._user_keys(writes), users, self.ttl_ms, now_ms):
            raise StaleStateError("state changed since this batch read it; retrying the batch")
        for user_id, write in writes.items():
            self._cache.after_write(user_id, signatures[user_id], write)

    def _item_events(
        self, epoch: int | None, item_timestamps: list[tuple[str, int]], sources: Sequence[Source]
    ) -> list[tuple[str, int, str, str]]:
        """(partition, offset, item, weight) per new event."""
        if epoch is None:
            return []
        if len(sources) != len(item_timestamps):
            raise ValueError("Redis Cluster needs the source of every new item")
        weights = self._decay.weights(item_timestamps, epoch)
        return [
            (_source_key(source), source.offset, item, repr(weight))
            for source, (item, weight) in zip(sources, weights, strict=True)
        ]

    async def _rebase_if_due(self, epoch: int, item_timestamps: list[tuple[str, int]]) -> int:
        """The epoch to write these events against, rebasing the stored scores first where
        their weights would grow too large."""
        new_epoch = self._decay.rebase_epoch(epoch, item_timestamps)
        if new_epoch is None:
            return epoch
        await self._io.rebase(new_epoch, self._decay.half_life_ms)
        return new_epoch

    def drop_cache(self) -> None:
        """Forget every user held in memory (after a rebalance): the next read fetches them."""
        self._cache.entries.clear()

    async def online_counters(self) -> dict[str, int]:
        raw = await self.client.hgetall(self.keys.online)
        return {name.decode(): int(value) for name, value in raw.items()}

    async def read_user(self, user_id: str) -> StoredUser | None:
        """A fresh read (no cache), for `interest inspect`."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(
            self.keys.user(user_id),
            ["offsets", "vector", "memory", "model_version", "recs", "updated_ms", "forget"],
        )
        pipe.lrange(self.keys.window(user_id), 0, -1)
        fields, window = await pipe.execute()
        if all(value is None for value in fields) and not window:
            return None
        return _decode_fresh(fields, window)
