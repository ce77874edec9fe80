"""The store's commands on Redis Cluster: one script call per user, pipelined per node.

A script on Redis Cluster reaches the keys of one hash slot. Each user's two keys share one
(the hash tag in KeyLayout), so a user's read and its write stay single scripts: the write is
atomic per user and keeps its compare-and-set on the user's offsets, which is what makes a
replayed batch change nothing. The counters every worker shares (popularity, online hit rate)
live in a slot of their own and are written first, by a script that counts each input event
once (it keeps the highest offset counted per partition, streams/lua/write_shared.lua): a crash
after it and before the users' writes replays events whose counts are in, and they are skipped.

A batch can now be written for some users and not others (another worker wrote one since the
read). The caller retries the batch then, as on one Redis; the users already written see their
events as replays, and the shared counters skip what they counted. Slot moves during
resharding answer MOVED or ASK: redis-py's cluster pipeline sends those commands again to the
new owner; a script a node has not seen yet (NOSCRIPT) is loaded everywhere and sent again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from streams.store_io import (
    REBASE_SCRIPT,
    Keys,
    Row,
    SharedWrite,
    UserValues,
    lua_script,
    pack_for_lua,
)

READ_USER_SCRIPT = lua_script("user_read", "read_user")
WRITE_USER_SCRIPT = lua_script("user_write", "write_user")
WRITE_SHARED_SCRIPT = lua_script("write_shared")


class ClusterScripts:
    """Redis Cluster: per-user scripts in one pipeline, the shared counters in one script."""

    per_event = True

    def __init__(self, client: RedisCluster, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self._read = client.register_script(READ_USER_SCRIPT)
        self._write = client.register_script(WRITE_USER_SCRIPT)
        self._shared = client.register_script(WRITE_SHARED_SCRIPT)
        self._rebase = client.register_script(REBASE_SCRIPT)

    async def read(
        self, user_keys: Sequence[tuple[str, str]], held: Sequence[bytes], popular_n: int
    ) -> tuple[list[Any], bytes | None, list[Row]]:
        calls = [([self.keys.popularity], ["ZREVRANGE", 0, popular_n - 1, "WITHSCORES"])]
        calls.append(([self.keys.popularity_epoch], ["GET"]))
        scripts = [
            (self._read, list(keys), [offsets])
            for keys, offsets in zip(user_keys, held, strict=True)
        ]
        popular, epoch, *rows = await self._pipelined(calls, scripts)
        return _flat(popular), epoch, [row or None for row in rows]

    async def write(
        self,
        shared: SharedWrite,
        user_keys: Sequence[tuple[str, str]],
        users: Sequence[UserValues],
        ttl_ms: int,
        now_ms: int,
    ) -> bool:
        if shared.item_events or shared.online_events:
            keys = [self.keys.popularity, self.keys.popularity_epoch, self.keys.online]
            args = [
                "" if shared.epoch is None else shared.epoch,
                pack_for_lua(shared.item_events),
                pack_for_lua(shared.online_events),
            ]
            if not await self._shared(keys=[*keys, self.keys.counted], args=args):
                return False
        scripts = [
            (self._write, list(keys), [ttl_ms, now_ms, pack_for_lua(user)])
            for keys, user in zip(user_keys, users, strict=True)
        ]
        written = await self._pipelined([], scripts)
        return all(written)

    async def rebase(self, new_epoch: int, half_life_ms: float) -> None:
        keys = [self.keys.popularity, self.keys.popularity_epoch]
        await self._rebase(keys=keys, args=[new_epoch, repr(half_life_ms)])

    async def _pipelined(
        self,
        calls: Sequence[tuple[list[str], list[Any]]],
        scripts: Sequence[tuple[AsyncScript, list[str], list[Any]]],
    ) -> list[Any]:
        """Plain commands (``[key], [COMMAND, *args]``) then script calls, in one pipeline,
        answers in order. A NOSCRIPT answer means that call did not run: its script is loaded
        on every primary and the call sent again."""
        ops = [(command, key, *args) for (key,), (command, *args) in calls]
        ops += [("EVALSHA", s.sha, len(keys), *keys, *args) for s, keys, args in scripts]
        answers = await self._send(ops)
        missing = [i for i, a in enumerate(answers) if isinstance(a, NoScriptError)]
        if missing:
            for script in {scripts[i - len(calls)][0] for i in missing}:
                await self.client.script_load(script.script)
            for i, answer in zip(missing, await self._send([ops[i] for i in missing]), strict=True):
                answers[i] = answer
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return answers

    async def _send(self, ops: Sequence[tuple[Any, ...]]) -> list[Any]:
        pipe = self.client.pipeline()
        for op in ops:
            pipe.execute_command(*op)
        return await pipe.execute(raise_on_error=False)


def _flat(pairs: list[Any]) -> list[Any]:
    """ZREVRANGE WITHSCORES as a flat item, score list (the cluster client pairs them up)."""
    if pairs and isinstance(pairs[0], list | tuple):
        return [value for pair in pairs for value in pair]
    return pairs
