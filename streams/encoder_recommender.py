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
from dataclasses import dataclass

import numpy as np

from encoder.features import time_gap_bucket
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


@dataclass(frozen=True, slots=True)
class CachedState:
    version: str
    # The user's applied offsets when this state was made (`window.offsets_signature`): any
    # event applied elsewhere since (another worker, before a rebalance) changes it.
    signature: str
    state: EncoderStates  # batch of one


class StateCache:
    """Bounded LRU of per-user encoder states (a state is tens of KB: bound it by users)."""

    def __init__(self, max_users: int) -> None:
        self.max_users = max_users
        self._entries: OrderedDict[str, CachedState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user_id: str, version: str, signature: str) -> EncoderStates | None:
        entry = self._entries.get(user_id)
        if entry is None or entry.version != version or entry.signature != signature:
            return None
        self._entries.move_to_end(user_id)
        return entry.state

    def put(self, user_id: str, entry: CachedState) -> None:
        self._entries[user_id] = entry
        self._entries.move_to_end(user_id)
        while len(self._entries) > self.max_users:
            self._entries.popitem(last=False)


class EncoderRecommender:
    source = "encoder"

    def __init__(self, runtime: EncoderRuntime, cache_users: int = 10_000) -> None:
        self.runtime = runtime
        self.cache = StateCache(cache_users)
        self._type_index = {name: i for i, name in enumerate(runtime.event_types)}

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
        for i in range(1, len(window)):
            seconds = (window[i].timestamp_ms - window[i - 1].timestamp_ms) / 1000
            gaps[i] = time_gap_bucket(seconds, rt.n_time_buckets)
        return items, types, gaps

    def _event_features(self, request: Request) -> tuple[int, int, int]:
        window = request.window
        item = int(self.runtime.index_of([request.event.item_id])[0])
        gap = 0
        if len(window) > 1:
            seconds = (window[-1].timestamp_ms - window[-2].timestamp_ms) / 1000
            gap = time_gap_bucket(seconds, self.runtime.n_time_buckets)
        return item, self._type_index[request.event.event_type], gap

    def _memory(self, stored: StoredModelState | None) -> np.ndarray | None:
        if stored is None or stored.memory is None or stored.model_version != self.model_version:
            return None  # another model's memory means nothing to this one
        return np.frombuffer(stored.memory, dtype=np.float32).reshape(1, -1)

    def _rebuild(
        self, windows: list[Sequence[WindowEntry]], memories: list[np.ndarray | None]
    ) -> list[EncoderStates]:
        features = [self._features(window) for window in windows]
        _, states = self.runtime.rebuild(
            [f[0] for f in features],
            [f[1] for f in features],
            [f[2] for f in features],
            memory=[None if m is None else m[0] for m in memories],
        )
        return states.split()

    # ------------------------------------------------------------------ the batch

    def recommend(self, batch: Batch) -> Result:
        rt = self.runtime
        requests = batch.requests
        per_user: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            per_user.setdefault(request.event.user_id, []).append(index)

        # 1. Start states: cache hits, empty users, and one batched rebuild for the rest.
        current: dict[str, EncoderStates] = {}
        missing: list[str] = []
        for user_id in per_user:
            prior = batch.prior_windows.get(user_id, ())
            cached = self.cache.get(user_id, rt.version, batch.prior_signatures[user_id])
            if cached is not None:
                current[user_id] = cached
            elif not prior:
                current[user_id] = rt.initial_state(1)
            else:
                missing.append(user_id)
        if missing:
            rebuilt = self._rebuild(
                [batch.prior_windows[u] for u in missing],
                [self._memory(batch.stored.get(u)) for u in missing],
            )
            current.update(zip(missing, rebuilt, strict=True))

        # 2. One step per event, batched across users round by round.
        vectors = np.zeros((len(requests), rt.d_model), np.float32)
        rounds = max((len(indices) for indices in per_user.values()), default=0)
        for r in range(rounds):
            stepping: list[tuple[str, int]] = []
            inserted: list[tuple[str, int]] = []
            for user_id, indices in per_user.items():
                if r < len(indices):
                    index = indices[r]
                    (stepping if requests[index].appended else inserted).append((user_id, index))
            if stepping:
                features = np.array(
                    [self._event_features(requests[i]) for _, i in stepping], np.int64
                )
                stacked = EncoderStates.stack([current[u] for u, _ in stepping])
                out, states = rt.step(stacked, features[:, 0], features[:, 1], features[:, 2])
                for (user_id, index), state, vector in zip(
                    stepping, states.split(), out, strict=True
                ):
                    current[user_id] = state
                    vectors[index] = vector
            if inserted:
                # Out of time order: recompute from the window; the persisted memory is that of
                # the events before, so the long-term part is approximate for this event.
                rebuilt = self._rebuild(
                    [requests[i].window for _, i in inserted],
                    [current[u].memory for u, _ in inserted],
                )
                for (user_id, index), state in zip(inserted, rebuilt, strict=True):
                    current[user_id] = state
                    vectors[index] = state.vectors[0]

        # 3. Top-K with seen items excluded; cold users fall back to popularity.
        seen = [rt.index_of([e.item_id for e in r.window]) for r in requests]
        known = [bool((s > 0).any()) for s in seen]
        top, scores = rt.top_k(vectors, batch.k, exclude=seen)
        recommendations = []
        for request, is_known, row, row_scores in zip(requests, known, top, scores, strict=True):
            if is_known:
                items = [
                    (rt.item_ids[int(i)], float(s))
                    for i, s in zip(row, row_scores, strict=True)
                    if i > 0
                ]
                recommendations.append(Recommendation(items, rt.version, "encoder"))
            else:
                items = popular_unseen(batch.popular, request.window, batch.k)
                recommendations.append(Recommendation(items, rt.version, "popularity"))

        # 4. Persist and cache each user's state after its last event.
        updates: dict[str, ModelUpdate] = {}
        for user_id in per_user:
            state = current[user_id]
            signature = batch.final_signatures[user_id]
            self.cache.put(user_id, CachedState(rt.version, signature, state))
            updates[user_id] = ModelUpdate(
                vector=np.ascontiguousarray(state.vectors[0], np.float32).tobytes(),
                memory=np.ascontiguousarray(state.memory[0], np.float32).tobytes(),
                model_version=rt.version,
            )
        return Result(recommendations, updates)
