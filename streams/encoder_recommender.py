"""The exported encoder in the stream: incremental interest vectors and top-K per event.

Per micro-batch, for every touched user:
1. start state: the worker-memory LRU entry when it matches the user's window before the batch
   (same model version, same newest event), else rebuilt from the Redis window plus the
   persisted long-term memory (one batched `rebuild` for all such users: after a restart, a
   rebalance or a model change);
2. one `step` per event, batched across users round by round (round r = each user's r-th event
   in this batch); an event that arrived out of time order is inserted into the window and the
   user is rebuilt from it instead;
3. top-K by dot product with the seen items excluded, one matrix product for the whole batch.
A user with no event the model knows (new user, new items only) gets the popularity baseline,
marked `source: "popularity"`.

Numpy and ONNX Runtime only: this module never imports torch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from collections.abc import Set as AbstractSet

import numpy as np

from encoder.features import DEFAULT_EVENT_TYPE, time_gap_bucket
from export.runtime import EncoderRuntime, EncoderStates
from streams.recommend import (
    Batch,
    ModelUpdate,
    Recommendation,
    Request,
    Result,
    StoredModelState,
    popular_unseen,
)
from streams.window import WindowEntry


class StateSlab:
    """Per-user encoder states in preallocated arrays, one row per cached user, LRU-evicted.

    Why a slab: a state is ~100 KB (attention caches). The batch's steps run on the users'
    rows where they lie (``EncoderRuntime.step_rows``): no copy in or out per batch, which
    cost more than the model itself. A batch checks its users' rows out of the LRU first, so
    that a batch that fails half way leaves no entry claiming a half-stepped state; it checks
    them back in with their new signatures when it is done.

    The slab's memory is committed when it is made (``max_users`` x the state size, ~1 GB
    at the defaults), not page by page as users arrive: on these machines the first write to
    a fresh page cost 10x the write (210-270 ms per 1000 new users against 20-26 ms), and that
    landed on the inference thread exactly when a restarted worker catches up on a backlog.
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


class EncoderRecommender:
    source = "encoder"

    def __init__(self, runtime: EncoderRuntime, cache_users: int = 10_000) -> None:
        self.runtime = runtime
        self._empty = runtime.initial_state(1)
        self.cache = StateSlab(self._empty, cache_users)
        self._item_names = np.array(runtime.item_ids, dtype=object)  # index -> id, 0 -> None
        config = runtime.manifest.get("config", {})
        # A model trained without types/timestamps saw only the defaults: feed it the same.
        self._use_types = bool(config.get("uses_event_types", True))
        self._use_gaps = bool(config.get("uses_time_gaps", True))
        self._type_index = {
            name: (i if self._use_types else DEFAULT_EVENT_TYPE)
            for i, name in enumerate(runtime.event_types)
        }

    @property
    def model_version(self) -> str:
        return self.runtime.version

    # ------------------------------------------------------------------ features

    def _features(self, window: Sequence[WindowEntry]) -> tuple[np.ndarray, ...]:
        """(items, types, gaps) of a window, oldest first, as the model was trained on them."""
        rt = self.runtime
        items = rt.index_of([entry.item_id for entry in window])
        types = np.fromiter((self._type_index[e.event_type] for e in window), np.int64, len(window))
        gaps = np.zeros(len(window), np.int64)
        for i in range(1, len(window) if self._use_gaps else 0):
            seconds = (window[i].timestamp_ms - window[i - 1].timestamp_ms) / 1000
            gaps[i] = time_gap_bucket(seconds, rt.n_time_buckets)
        return items, types, gaps

    def _event_features(self, request: Request, item: int) -> tuple[int, int, int]:
        window = request.window
        gap = 0
        if self._use_gaps and len(window) > 1:
            seconds = (window[-1].timestamp_ms - window[-2].timestamp_ms) / 1000
            gap = time_gap_bucket(seconds, self.runtime.n_time_buckets)
        return item, self._type_index[request.event.event_type], gap

    def _memory(self, stored: StoredModelState | None) -> np.ndarray | None:
        if stored is None or stored.memory is None or stored.model_version != self.model_version:
            return None  # another model's memory means nothing to this one
        return np.frombuffer(stored.memory, dtype=np.float32).reshape(1, -1)

    def _rebuild(
        self, windows: list[Sequence[WindowEntry]], memories: list[np.ndarray | None]
    ) -> EncoderStates:
        features = [self._features(window) for window in windows]
        _, states = self.runtime.rebuild(
            [f[0] for f in features],
            [f[1] for f in features],
            [f[2] for f in features],
            memory=[None if m is None else m[0] for m in memories],
        )
        return states

    # ------------------------------------------------------------------ the batch

    def recommend(self, batch: Batch) -> Result:
        rt = self.runtime
        requests = batch.requests
        per_user: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            per_user.setdefault(request.event.user_id, []).append(index)

        # 1. Start states, in the users' slab rows: a cache hit's row holds it already; users
        # without history get the empty state; one batched rebuild for the rest (after a
        # restart, a rebalance or a model change).
        users = list(per_user)
        cached: set[str] = set()
        prior_seen: dict[str, np.ndarray] = {}  # model indices of the prior window's items
        for user_id in users:
            if self.cache.lookup(user_id, rt.version, batch.prior_signatures[user_id]) is not None:
                cached.add(user_id)
                prior_seen[user_id] = self.cache.window_items(user_id)
        rows = self.cache.check_out(users)
        try:
            result, final_items = self._recommend(batch, per_user, users, rows, cached, prior_seen)
        except BaseException:
            self.cache.release(rows)  # no entry may claim a half-stepped state
            raise
        self.cache.check_in(
            users, rows, rt.version, [batch.final_signatures[u] for u in users], final_items
        )
        return result

    def _recommend(
        self,
        batch: Batch,
        per_user: dict[str, list[int]],
        users: list[str],
        rows: np.ndarray,
        cached: AbstractSet[str],
        prior_seen: dict[str, np.ndarray],
    ) -> tuple[Result, list[np.ndarray]]:
        """The batch on the users' checked-out slab rows (``rows[i]`` is ``users[i]``'s):
        the result and each user's window items to cache."""
        rt = self.runtime
        requests = batch.requests
        slab = self.cache.states
        row_of = {user_id: int(row) for user_id, row in zip(users, rows, strict=True)}
        other_users = [u for u in users if u not in cached]
        event_items = rt.index_of([r.event.item_id for r in requests])  # once per batch
        # No history: the empty state; a history: one batched rebuild.
        fresh = [u for u in other_users if not batch.prior_windows.get(u)]
        missing = [u for u in other_users if batch.prior_windows.get(u)]
        if fresh:
            self.cache.put(np.array([row_of[u] for u in fresh], np.int64), self._empty)
        if missing:
            rebuilt = self._rebuild(
                [batch.prior_windows[u] for u in missing],
                [self._memory(batch.stored.get(u)) for u in missing],
            )
            self.cache.put(np.array([row_of[u] for u in missing], np.int64), rebuilt)

        # 2. One step per event, batched across users round by round (round r: each user's
        # r-th event of the batch), in place in the slab rows.
        vectors = np.zeros((len(requests), rt.d_model), np.float32)
        rounds = max((len(indices) for indices in per_user.values()), default=0)
        for r in range(rounds):
            stepping: list[tuple[int, int]] = []  # (slab row, request index)
            inserted: list[tuple[int, int]] = []
            unknown: list[tuple[int, int]] = []  # an item the model does not know: no step
            for user_id, indices in per_user.items():
                if r < len(indices):
                    index = indices[r]
                    if not requests[index].appended:
                        target = inserted
                    elif event_items[index] > 0:
                        target = stepping
                    else:
                        target = unknown
                    target.append((row_of[user_id], index))
            if unknown:  # the state stays as it is; the vector is the one before the event
                vectors[[i for _, i in unknown]] = slab.vectors[[w for w, _ in unknown]]
            if stepping:
                features = np.array(
                    [self._event_features(requests[i], int(event_items[i])) for _, i in stepping],
                    np.int64,
                )
                step_rows = np.array([w for w, _ in stepping], np.int64)
                out = rt.step_rows(slab, step_rows, features[:, 0], features[:, 1], features[:, 2])
                vectors[[i for _, i in stepping]] = out
            if inserted:
                # Out of time order: recompute from the window; the persisted memory is that of
                # the events before, so the long-term part is approximate for this event.
                inserted_rows = np.array([w for w, _ in inserted], np.int64)
                rebuilt = self._rebuild(
                    [requests[i].window for _, i in inserted],
                    list(slab.memory[inserted_rows][:, None]),
                )
                self.cache.put(inserted_rows, rebuilt)
                vectors[[i for _, i in inserted]] = rebuilt.vectors

        # 3. Top-K with seen items excluded; cold users fall back to popularity. The seen items
        # grow per user event by event, so the cost per event does not depend on the window.
        # Built as one (events, seen) index matrix (0 = nothing): a per-event array and a
        # per-user lookup call cost more Python than the scoring itself. A cached user's window
        # items come mapped from the cache; only the others' windows are mapped here (mapping
        # every window each batch cost O(window) per user: 7.5 ms at 500 full windows).
        unmapped = [batch.prior_windows.get(u, ()) for u in other_users]
        mapped = rt.index_of([entry.item_id for prior in unmapped for entry in prior])
        start = 0
        for user_id, prior in zip(other_users, unmapped, strict=True):
            prior_seen[user_id] = mapped[start : start + len(prior)]
            start += len(prior)
        lengths = np.array([len(prior_seen[user_id]) for user_id in users], np.int64)
        ends = np.cumsum(lengths)
        flat = np.concatenate([prior_seen[user_id] for user_id in users]) if users else mapped
        known_so_far = np.concatenate([[0], np.cumsum(flat > 0)])
        # The model knows at least one of the user's prior items.
        knows_prior = known_so_far[ends] > known_so_far[ends - lengths]
        # Per request: its user's position in `users` and how many of the user's events in this
        # batch come before it; a row excludes the prior items, then the user's batch items so far.
        # (Whole-array operations: a numpy assignment per user cost ~3 us each.)
        position = {user_id: i for i, user_id in enumerate(users)}
        request_user = np.fromiter(
            (position[r.event.user_id] for r in requests), np.int64, len(requests)
        )
        per_position = np.bincount(request_user, minlength=len(users))
        by_user = np.argsort(request_user, kind="stable")  # each user's requests in order
        rank = np.empty(len(requests), np.int64)
        rank[by_user] = np.arange(len(requests)) - np.repeat(
            np.cumsum(per_position) - per_position, per_position
        )
        # users with several events: their request indices
        repeats = [indices for indices in per_user.values() if len(indices) > 1]
        prior_length = lengths[request_user]
        width = int((prior_length + rank).max()) + 1 if len(requests) else 1
        columns = np.arange(width)
        padded = np.append(flat, 0)  # index len(flat): a pad, for columns past a user's prior
        source = np.minimum((ends - lengths)[request_user][:, None] + columns, len(flat))
        exclude = np.where(columns < prior_length[:, None], padded[source], 0)
        exclude[np.arange(len(requests)), prior_length + rank] = event_items
        known_rows = knows_prior[request_user] | (event_items > 0)
        for indices in repeats:  # earlier batch events of the same user, in order
            for later, index in enumerate(indices[1:], start=1):
                exclude[index, prior_length[index] : prior_length[index] + later] = event_items[
                    indices[:later]
                ]
                known_rows[index] |= known_rows[indices[later - 1]]
        known = known_rows.tolist()
        top, scores = rt.top_k(vectors, batch.k, exclude=exclude)
        names = self._item_names[top].tolist()  # (B, k) item ids, None for padding
        popular_seen: dict[str, set[str]] = {}
        recommendations = []
        for request, is_known, row_names, row_scores in zip(
            requests, known, names, scores.tolist(), strict=True
        ):
            if is_known:
                if None in row_names:  # fewer than k items left to recommend: drop padding
                    row_scores = [s for n, s in zip(row_names, row_scores, strict=True) if n]
                    row_names = [n for n in row_names if n]
                recommendations.append(Recommendation(row_names, row_scores, rt.version, "encoder"))
            else:  # the model knows none of this user's items yet
                user_id = request.event.user_id
                seen_names = popular_seen.setdefault(
                    user_id, {e.item_id for e in batch.prior_windows.get(user_id, ())}
                )
                seen_names.add(request.event.item_id)
                items = popular_unseen(batch.popular, seen_names, batch.k)
                recommendations.append(Recommendation.of(items, rt.version, "popularity"))

        # 4. Persist and cache each user's state after its last event, and its window's items:
        # the prior ones plus the batch's, less those trimmed off the front (an event inserted
        # out of time order: mapped afresh).
        final_items = []
        for user_id in users:
            indices = per_user[user_id]
            window = requests[indices[-1]].window  # the window after the user's last event
            # One event (the common case): a slice, not an index array built from a list.
            new_items = (
                event_items[indices[0] : indices[0] + 1]
                if len(indices) == 1
                else event_items[indices]
            )
            prior = prior_seen[user_id]
            keep_prior = len(window) - len(new_items)  # of the prior items, the newest ones
            if 0 <= keep_prior <= len(prior) and all(requests[i].appended for i in indices):
                final_items.append(np.concatenate([prior[len(prior) - keep_prior :], new_items]))
            else:
                final_items.append(rt.index_of([entry.item_id for entry in window]))
        # Serialised once for the batch and sliced per user: two tobytes() per user cost more.
        vector_rows = _rows_as_bytes(slab.vectors[rows])
        memory_rows = _rows_as_bytes(slab.memory[rows])
        updates = {
            user_id: ModelUpdate(
                vector=vector_rows[i],
                memory=memory_rows[i],
                model_version=rt.version,
            )
            for i, user_id in enumerate(users)
        }
        return Result(recommendations, updates), final_items


def _zeros(rows: int, like: np.ndarray) -> np.ndarray:
    """``rows`` rows shaped like those of ``like``, zeros, the memory committed (written)."""
    array = np.empty((rows, *like.shape[1:]), like.dtype)
    array.fill(0)
    return array


def _rows_as_bytes(array: np.ndarray) -> list[bytes]:
    """Each row of a (B, ...) array as float32 bytes, from one serialisation of the whole."""
    data = np.ascontiguousarray(array, np.float32).tobytes()
    size = len(data) // len(array) if len(array) else 0
    return [data[i : i + size] for i in range(0, len(data), size)] if size else []
