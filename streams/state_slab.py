"""The worker's cache of per-user encoder states: one row per cached user, LRU-evicted.

The only owner of that cache: the encoder recommender checks rows out for a batch, steps them
in place and checks them back in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from export.runtime import EncoderStates


class StateSlab:
    """Per-user encoder states in preallocated arrays, one row per cached user, LRU-evicted.

    Why a slab: a state is large (attention caches). The batch's steps run on the users' rows
    where they lie (``EncoderRuntime.step_rows``): no copy in or out per batch, which cost more
    than the model itself. A batch checks its users' rows out of the LRU first, so that a
    batch that fails half way leaves no entry claiming a half-stepped state; it checks them
    back in with their new signatures when it is done.

    The slab's memory is committed when it is made (``max_users`` x the state size), not page
    by page as users arrive: the first write to a fresh page costs many times the write itself,
    and that would land on the inference thread exactly when a restarted worker catches up on
    a backlog.
    """

    def __init__(self, template: EncoderStates, max_users: int) -> None:
        self.max_users = max_users
        capacity = max(1, max_users)
        self.states = EncoderStates(
            {name: _zeros(capacity, a) for name, a in template.arrays.items()},
            _zeros(capacity, template.vectors),
        )
        # user -> (row, version, offsets signature the state matches, the model indices of
        # the items in the user's window then)
        self.rows: OrderedDict[str, tuple[int, str, bytes, np.ndarray]] = OrderedDict()
        self.free = list(range(capacity - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, user_id: str, version: str, signature: bytes) -> int | None:
        entry = self.rows.get(user_id)
        if entry is None or entry[1] != version or entry[2] != signature:
            return None
        return entry[0]

    def window_items(self, user_id: str) -> np.ndarray:
        """The model indices of the items in the window the user's cached state matches
        (after a successful ``lookup``): the seen items, without re-mapping the window."""
        return self.rows[user_id][3]

    def hits(
        self, users: Sequence[str], version: str, signatures: Mapping[str, bytes]
    ) -> dict[str, np.ndarray]:
        """The users whose cached state matches their window (``signatures``, the window's
        offsets before the batch), each with its window's items."""
        return {
            user_id: self.window_items(user_id)
            for user_id in users
            if self.lookup(user_id, version, signatures[user_id]) is not None
        }

    def check_out(self, users: Sequence[str]) -> np.ndarray:
        """A row for each user, out of the LRU: the user's own row if it has one, else a free
        or the least recently used other user's. Grows the slab when a batch has more users
        than it has rows."""
        rows = np.empty(len(users), np.int64)
        new = []
        for i, user_id in enumerate(users):
            entry = self.rows.pop(user_id, None)
            if entry is None:
                new.append(i)
            else:
                rows[i] = entry[0]
        short = len(new) - len(self.free) - len(self.rows)
        if short > 0:
            self._grow(len(self.states) + short)
        for i in new:
            if self.free:
                rows[i] = self.free.pop()
            else:
                _, (rows[i], *_) = self.rows.popitem(last=False)
        return rows

    def check_in(
        self,
        users: Sequence[str],
        rows: np.ndarray,
        version: str,
        signatures: Sequence[bytes],
        window_items: Sequence[np.ndarray],
    ) -> None:
        """Cache checked-out users' rows as the state after the given windows, most recent
        last; rows over ``max_users`` go back to the free list, least recently used first."""
        for user_id, row, signature, items in zip(
            users, rows.tolist(), signatures, window_items, strict=True
        ):
            self.rows[user_id] = (row, version, signature, items)
        while len(self.rows) > self.max_users:
            _, (row, *_) = self.rows.popitem(last=False)
            self.free.append(row)

    def forget(self, users: Iterable[str]) -> None:
        """Drop these users' states, their rows zeroed: a forgotten user's state must not stay
        in memory until its row happens to be reused."""
        for user_id in users:
            entry = self.rows.pop(user_id, None)
            if entry is not None:
                row = entry[0]
                for a in self.states.arrays.values():
                    a[row] = 0
                self.states.vectors[row] = 0
                self.free.append(row)

    def release(self, rows: np.ndarray) -> None:
        """Return checked-out rows without caching them (the batch failed)."""
        self.free.extend(rows.tolist())

    def put(self, rows: np.ndarray, states: EncoderStates) -> None:
        """Write ``states`` into ``rows``: one row per row, or one row for all of them."""
        for name, a in self.states.arrays.items():
            a[rows] = states.arrays[name]
        self.states.vectors[rows] = states.vectors

    def _grow(self, capacity: int) -> None:
        old = len(self.states)
        self.states = EncoderStates(
            {
                name: np.concatenate([a, _zeros(capacity - old, a)])
                for name, a in self.states.arrays.items()
            },
            np.concatenate([self.states.vectors, _zeros(capacity - old, self.states.vectors)]),
        )
        self.free.extend(range(capacity - 1, old - 1, -1))


def _zeros(rows: int, like: np.ndarray) -> np.ndarray:
    """``rows`` rows shaped like those of ``like``, zeros, the memory committed (written)."""
    array = np.empty((rows, *like.shape[1:]), like.dtype)
    array.fill(0)
    return array
