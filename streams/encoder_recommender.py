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
from export.runtime import RING_STATE, EncoderRuntime, EncoderStates, slot_index
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

    Why a slab: a state is ~100 KB (attention caches); keeping one small array set per user
    meant a copy to stack users into a batch and another to split them again, which cost more
    than the model itself. Rows are gathered with one fancy-index per tensor, and a user whose
    row still holds the state the batch started from gets back only the cache slots the
    batch's steps wrote (the caches are ring buffers, export/graphs.py), not its whole state.
    np.zeros pages are only committed when a row is first written.
    """

    def __init__(
        self, template: EncoderStates, max_users: int, ring_caches: dict[str, int]
    ) -> None:
        self.max_users = max_users
        self.ring_caches = ring_caches  # cache name -> slot axis
        self.arrays = {
            name: np.zeros((max_users, *a.shape[1:]), a.dtype)
            for name, a in template.arrays.items()
        }
        self.vectors = np.zeros((max_users, template.vectors.shape[1]), np.float32)
        # user -> (row, version, offsets signature the state matches, the model indices of
        # the items in the user's window then)
        self.rows: OrderedDict[str, tuple[int, str, bytes, np.ndarray]] = OrderedDict()
        self.free = list(range(max_users - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, user_id: str, version: str, signature: bytes) -> int | None:
        entry = self.rows.get(user_id)
        if entry is None or entry[1] != version or entry[2] != signature:
            return None
        self.rows.move_to_end(user_id)
        return entry[0]

    def window_items(self, user_id: str) -> np.ndarray:
        """The model indices of the items in the window the user's cached state matches
        (after a successful ``lookup``): the seen items, without re-mapping the window."""
        return self.rows[user_id][3]

    def gather(self, rows: Sequence[int], total: int) -> EncoderStates:
        """States of ``total`` users, the first ``len(rows)`` copied from these slab rows, the
        rest uninitialised (the caller fills them)."""
        index = np.asarray(rows, np.int64)
        out = EncoderStates(
            {n: np.empty((total, *a.shape[1:]), a.dtype) for n, a in self.arrays.items()},
            np.empty((total, self.vectors.shape[1]), np.float32),
        )
        # mode="clip": with the default "raise" numpy copies through a buffer when given
        # `out`; slab rows are always in range.
        for name, a in self.arrays.items():
            np.take(a, index, axis=0, out=out.arrays[name][: len(index)], mode="clip")
        np.take(self.vectors, index, axis=0, out=out.vectors[: len(index)], mode="clip")
        return out

    def store(
        self,
        users: Sequence[str],
        states: EncoderStates,
        version: str,
        signatures: Sequence[bytes],
        window_items: Sequence[np.ndarray],
        unchanged_since_lookup: AbstractSet[int] = frozenset(),
        slot_writes: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    ) -> None:
        """Cache users' states (row i of ``states`` is ``users[i]``'s) with the model indices
        of the items in their windows.

        ``unchanged_since_lookup``: rows whose slab row, found by ``lookup`` for this batch,
        held the state the batch started from, and which the batch changed only by steps;
        ``slot_writes``: each step's (rows, ring slots written). Those rows get only the
        written slots plus their memory, ring and vector; every other row is copied whole.
        """
        if self.max_users == 0:
            return
        n = len(users)
        # A batch with more users than the cache keeps its last rows (in the recommender's work
        # order: the users that were not cached before).
        first = max(0, n - self.max_users)
        slab_rows = np.full(n, -1, np.int64)
        for i, user_id in enumerate(users):  # take the batch's rows out of the LRU first ...
            entry = self.rows.pop(user_id, None)
            if entry is None:
                continue
            if i >= first:
                slab_rows[i] = entry[0]
            else:
                self.free.append(entry[0])
        for i in range(first, n):  # ... so that evicting cannot take one of them
            if slab_rows[i] < 0:
                if self.free:
                    slab_rows[i] = self.free.pop()
                else:
                    _, (slab_rows[i], *_) = self.rows.popitem(last=False)
        for i in range(first, n):
            self.rows[users[i]] = (int(slab_rows[i]), version, signatures[i], window_items[i])

        partial = np.zeros(n, bool)
        partial[[i for i in unchanged_since_lookup if i >= first]] = True
        whole = np.flatnonzero(~partial[first:]) + first
        if len(whole):
            for name, a in self.arrays.items():
                a[slab_rows[whole]] = states.arrays[name][whole]
            self.vectors[slab_rows[whole]] = states.vectors[whole]
        stepped = np.flatnonzero(partial)
        if not len(stepped):
            return
        for rows, slots in slot_writes:
            keep = partial[rows]
            rows, slots = rows[keep], slots[keep]
            for name, axis in self.ring_caches.items():
                self.arrays[name][slot_index(slab_rows[rows], slots, axis)] = states.arrays[name][
                    slot_index(rows, slots, axis)
                ]
        for name, a in self.arrays.items():
            if name not in self.ring_caches:  # memory, ring
                a[slab_rows[stepped]] = states.arrays[name][stepped]
        self.vectors[slab_rows[stepped]] = states.vectors[stepped]


class EncoderRecommender:
    source = "encoder"

    def __init__(self, runtime: EncoderRuntime, cache_users: int = 10_000) -> None:
        self.runtime = runtime
        self._empty = runtime.initial_state(1)
        self.cache = StateSlab(self._empty, cache_users, runtime.ring_caches)
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

    def _reset(self, work: EncoderStates, first: int) -> None:
        """Rows from ``first`` on: the state of a user with no history.

        Why not ``initial_state(len(users))``: that repeats the empty state for every user of
        the batch (~50 MB at 500 users, with the GIL held) when only a few are not cached."""
        empty = self._empty
        for name, a in work.arrays.items():
            a[first:] = empty.arrays[name]
        work.vectors[first:] = 0.0

    @staticmethod
    def _put(work: EncoderStates, rows: Sequence[int], states: EncoderStates) -> None:
        index = np.asarray(rows, np.int64)
        for name, a in work.arrays.items():
            a[index] = states.arrays[name]
        work.vectors[index] = states.vectors

    # ------------------------------------------------------------------ the batch

    def recommend(self, batch: Batch) -> Result:
        rt = self.runtime
        requests = batch.requests
        per_user: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            per_user.setdefault(request.event.user_id, []).append(index)

        # 1. Start states, one row per user in `work`: cache hits gathered from the slab,
        # the empty state for users without history, one batched rebuild for the rest.
        # Work rows: the cache hits first (gathered straight into the front of `work`), then
        # the users without a cached state.
        slab_rows: list[int] = []
        hit_users: list[str] = []
        other_users: list[str] = []
        prior_seen: dict[str, np.ndarray] = {}  # model indices of the prior window's items
        for user_id in per_user:
            slab_row = self.cache.lookup(user_id, rt.version, batch.prior_signatures[user_id])
            if slab_row is None:
                other_users.append(user_id)
            else:
                hit_users.append(user_id)
                slab_rows.append(slab_row)
                prior_seen[user_id] = self.cache.window_items(user_id)
        users = hit_users + other_users
        row_of = {user_id: i for i, user_id in enumerate(users)}
        event_items = rt.index_of([r.event.item_id for r in requests])  # once per batch
        work = self.cache.gather(slab_rows, len(users))
        if other_users:  # no history: the empty state; a history: one batched rebuild
            self._reset(work, len(hit_users))
            missing = [u for u in other_users if batch.prior_windows.get(u)]
            if missing:
                rebuilt = self._rebuild(
                    [batch.prior_windows[u] for u in missing],
                    [self._memory(batch.stored.get(u)) for u in missing],
                )
                self._put(work, [row_of[u] for u in missing], rebuilt)

        # 2. One step per event, batched across users round by round, in place in `work`.
        # Rows changed only by steps go back to the slab as the slots written (`store`).
        unchanged = set(range(len(hit_users)))
        slot_writes: list[tuple[np.ndarray, np.ndarray]] = []
        ring = work.arrays[RING_STATE]
        vectors = np.zeros((len(requests), rt.d_model), np.float32)
        rounds = max((len(indices) for indices in per_user.values()), default=0)
        for r in range(rounds):
            stepping: list[tuple[int, int]] = []  # (work row, request index)
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
                vectors[[i for _, i in unknown]] = work.vectors[[w for w, _ in unknown]]
            if stepping:
                stepping.sort()  # work order: when everyone steps, `work` is the graph input
                features = np.array(
                    [self._event_features(requests[i], int(event_items[i])) for _, i in stepping],
                    np.int64,
                )
                rows = np.array([w for w, _ in stepping], np.int64)
                slot_writes.append((rows, ring[rows]))
                # everyone steps, in work order: no gather
                everyone = len(rows) == len(users)
                out = rt.step_in_place(
                    work,
                    features[:, 0],
                    features[:, 1],
                    features[:, 2],
                    rows=None if everyone else rows,
                )
                vectors[[i for _, i in stepping]] = out
            if inserted:
                # Out of time order: recompute from the window; the persisted memory is that of
                # the events before, so the long-term part is approximate for this event.
                rows = [w for w, _ in inserted]
                rebuilt = self._rebuild(
                    [requests[i].window for _, i in inserted],
                    list(work.take(rows).memory[:, None]),
                )
                self._put(work, rows, rebuilt)
                unchanged.difference_update(rows)
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
        # Per request: its user's work row and how many of the user's events in this batch
        # come before it; a row excludes the prior items, then the user's batch items so far.
        request_user = np.empty(len(requests), np.int64)
        rank = np.empty(len(requests), np.int64)
        repeats: list[list[int]] = []  # users with several events: their request indices
        for user_id, indices in per_user.items():
            request_user[indices] = row_of[user_id]
            rank[indices] = range(len(indices))
            if len(indices) > 1:
                repeats.append(indices)
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
        self.cache.store(
            users,
            work,
            rt.version,
            [batch.final_signatures[u] for u in users],
            final_items,
            unchanged,
            slot_writes,
        )
        # Serialised once for the batch and sliced per user: two tobytes() per user cost more.
        vector_rows, memory_rows = _rows_as_bytes(work.vectors), _rows_as_bytes(work.memory)
        updates = {
            user_id: ModelUpdate(
                vector=vector_rows[i],
                memory=memory_rows[i],
                model_version=rt.version,
            )
            for i, user_id in enumerate(users)
        }
        return Result(recommendations, updates)


def _rows_as_bytes(array: np.ndarray) -> list[bytes]:
    """Each row of a (B, ...) array as float32 bytes, from one serialisation of the whole."""
    data = np.ascontiguousarray(array, np.float32).tobytes()
    size = len(data) // len(array) if len(array) else 0
    return [data[i : i + size] for i in range(0, len(data), size)] if size else []
