"""The users this worker last read or wrote, as Redis holds them, least recently used first out.

Why: a batch's read then sends Redis only the offsets each user is cached with, and gets back
one ``false`` per user nothing else wrote since, instead of the user's hash and window to decode
again (a worker that owns its partitions hits nearly always). A cached user is what Redis holds
while its ``raw_offsets`` are still the stored ``offsets``: every write changes them.

The store owns the one cache and is its only user; entries are never changed once put, only
replaced, so a reader may keep one across an await.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from streams.window import UserState

if TYPE_CHECKING:
    from streams.store import UserWrite


@dataclass(slots=True)
class CachedUser:
    """A user as this worker last read or wrote it. Never changed once cached; ``state`` is
    shared, not copied: whoever hands it to a batch copies it (the batch changes it and may
    fail before writing)."""

    raw_offsets: bytes
    state: UserState
    vector: bytes | None
    memory: bytes | None
    model_version: str | None
    recs: list[str] | None


@dataclass(slots=True)
class UserCache:
    """Users this worker last read or wrote, LRU, keyed by user id."""

    max_users: int
    entries: OrderedDict[str, CachedUser] = field(default_factory=OrderedDict)

    def peek(self, user_id: str) -> CachedUser | None:
        return self.entries.get(user_id)

    def touch(self, user_id: str) -> None:
        if user_id in self.entries:
            self.entries.move_to_end(user_id)

    def put(self, user_id: str, entry: CachedUser) -> None:
        # Not copied: what is put is not changed again (readers hand out copies).
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
        if write.wipe:
            # A forget: nothing from before it survives, only what the write itself holds.
            self.put(user_id, _as_written(offsets, write))
            return
        keeps_model = write.vector is None
        if (keeps_model or write.recs is None) and prior is None:
            return
        model = prior if keeps_model else write
        assert model is not None
        self.put(
            user_id,
            CachedUser(
                offsets,
                write.state,
                model.vector,
                model.memory,
                model.model_version,
                prior.recs if write.recs is None and prior is not None else write.recs,
            ),
        )


def _as_written(offsets: bytes, write: UserWrite) -> CachedUser:
    return CachedUser(
        offsets, write.state, write.vector, write.memory, write.model_version, write.recs
    )
