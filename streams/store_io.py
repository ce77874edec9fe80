"""The store's commands on one Redis: a batch is one read script and one write script.

`StateStore` (streams/store.py) decides what to read and write and keeps the per-user cache;
an I/O object sends it. `BatchScripts` here serves one Redis (or a replicated pair), where a
script may touch any key, so a whole batch is read and written atomically in one call each;
`ClusterScripts` (streams/cluster_io.py) serves Redis Cluster, where a script reaches one slot.
Both take and return the same values, so the store and its tests are the same for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

import msgpack
import redis.asyncio as aioredis


def lua_script(*names: str) -> str:
    """Scripts shipped in streams/lua/ as package data (an installed wheel has them too),
    joined in order: a fragment that defines a function goes before the script calling it."""
    folder = resources.files("streams").joinpath("lua")
    return "\n".join(folder.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in names)


def pack_for_lua(value: object) -> bytes:
    """MessagePack as Redis's Lua cmsgpack reads it: it predates the bin type, so bytes go as
    (raw) strings, which Lua strings hold byte for byte."""
    return msgpack.packb(value, use_bin_type=False)


# Joined once, at import: a wheel without its scripts fails here, not at the first batch.
READ_SCRIPT = lua_script("user_read", "read")
WRITE_SCRIPT = lua_script("user_write", "write")
REBASE_SCRIPT = lua_script("rebase")


@dataclass(frozen=True, slots=True)
class Keys:
    """The keys the I/O needs besides the users' (streams/store.py KeyLayout names them)."""

    popularity: str
    popularity_epoch: str
    online: str
    counted: str  # Redis Cluster only: the shared counters' replay guard


@dataclass(frozen=True, slots=True)
class SharedWrite:
    """What a batch adds to the counters every worker shares."""

    epoch: int | None  # the epoch the popularity weights are relative to
    increments: dict[str, float]  # item -> summed weight of its new events
    online: dict[str, int]  # online hit-rate counter -> increment
    # Event by event, with the "topic/partition" and offset each came from: what
    # ClusterScripts counts, once per event (empty unless the I/O asks for them).
    item_events: list[tuple[str, int, str, str]] = field(default_factory=list)
    online_events: list[tuple[str, int, str, int]] = field(default_factory=list)


# One user's write as the scripts take it: the 11 values streams/lua/write.lua describes.
UserValues = tuple[Any, ...]
# A user's read answer: None where the copy held is current, else the 7 stored values.
Row = list[Any] | None


class StoreIO(Protocol):
    # True when the shared counters are written apart from the users and need SharedWrite's
    # per-event lists to stay exact under replay.
    per_event: bool

    async def read(
        self, user_keys: Sequence[tuple[str, str]], held: Sequence[bytes], popular_n: int
    ) -> tuple[list[Any], bytes | None, list[Row]]:
        """(popular flat item/score list, epoch, per user its row)."""
        ...

    async def write(
        self,
        shared: SharedWrite,
        user_keys: Sequence[tuple[str, str]],
        users: Sequence[UserValues],
        ttl_ms: int,
        now_ms: int,
    ) -> bool:
        """False where a compare-and-set failed (the caller retries the batch)."""
        ...

    async def rebase(self, new_epoch: int, half_life_ms: float) -> None: ...


class BatchScripts:
    """One Redis: one atomic script per batch read and per batch write."""

    per_event = False

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.keys = keys
        self._read = client.register_script(READ_SCRIPT)
        self._write = client.register_script(WRITE_SCRIPT)
        self._rebase = client.register_script(REBASE_SCRIPT)

    async def read(
        self, user_keys: Sequence[tuple[str, str]], held: Sequence[bytes], popular_n: int
    ) -> tuple[list[Any], bytes | None, list[Row]]:
        keys = [self.keys.popularity, self.keys.popularity_epoch]
        for hash_key, list_key in user_keys:
            keys += [hash_key, list_key]
        result = await self._read(keys=keys, args=[popular_n, *held])
        return result[0], result[1], [row or None for row in result[2:]]

    async def write(
        self,
        shared: SharedWrite,
        user_keys: Sequence[tuple[str, str]],
        users: Sequence[UserValues],
        ttl_ms: int,
        now_ms: int,
    ) -> bool:
        keys = [self.keys.popularity, self.keys.popularity_epoch, self.keys.online]
        args: list[bytes | str | int | float] = [
            ttl_ms,
            now_ms,
            "" if shared.epoch is None else shared.epoch,
            len(shared.increments),
            len(shared.online),
        ]
        for item_id, weight in shared.increments.items():
            args += [item_id, repr(weight)]
        for name, increment in shared.online.items():
            args += [name, increment]
        for hash_key, list_key in user_keys:
            keys += [hash_key, list_key]
        args.append(pack_for_lua(list(users)))
        return bool(await self._write(keys=keys, args=args))

    async def rebase(self, new_epoch: int, half_life_ms: float) -> None:
        keys = [self.keys.popularity, self.keys.popularity_epoch]
        await self._rebase(keys=keys, args=[new_epoch, repr(half_life_ms)])
