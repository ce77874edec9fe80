"""The exported encoder in the stream: incremental interest vectors and top-K per event.

Per micro-batch (``EncoderRecommender.recommend``), for every touched user:
1. start state (``_start_states``): the state cache's row when it matches the user's window
   before the batch (same model version, same newest event), else rebuilt from the Redis
   window plus the persisted long-term memory (one batched `rebuild` for all such users: after
   a restart, a rebalance or a model change);
2. one `step` per event (``_step_rounds``), batched across users round by round (round r =
   each user's r-th event in this batch); an event that arrived out of time order is inserted
   into the window and the user is rebuilt from it instead;
3. the seen items to exclude (streams/seen_items.py), then top-K by dot product, one matrix
   product for the whole batch (``_recommendations``), over the model's items and the
   catalogue's items it does not know (streams/catalogue.py, INTEREST_CATALOGUE). A user with
   no event the model knows (new user, new items only) gets the popularity baseline, marked
   `source: "popularity"`;
4. each user's state and window items go back to the cache, and its vector and memory out as
   the ``ModelUpdate`` persisted beside its window.

Numpy and ONNX Runtime only: this module never imports torch.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from encoder.features import EVENT_TYPES, time_gap_bucket, window_gaps
from encoder.popularity import long_tail
from export.explain import memory_with
from export.runtime import EncoderRuntime, EncoderStates
from streams.catalogue import CatalogueWatch, ItemTable, seen_extra
from streams.explain import ModelInputs, explain_window, features
from streams.exposure import Catalogue, Exposure
from streams.recommend import (
    POPULAR,
    Batch,
    ModelUpdate,
    Recommendation,
    Request,
    Result,
    StoredModelState,
    popular_unseen,
)
from streams.seen_items import request_ranks, seen_matrix, typed_exclusion
from streams.state_slab import StateSlab
from streams.window import WindowEntry

# (slab row, request index) of the events of one step round
RoundEvents = list[tuple[int, int]]


class EncoderRecommender:
    source = "encoder"

    def __init__(
        self,
        runtime: EncoderRuntime,
        cache_users: int = 10_000,
        explain_events: int = 0,
        catalogue: Path | None = None,
        catalogue_poll_seconds: float = 5.0,
        exclude_seen_types: Collection[str] = EVENT_TYPES,
    ) -> None:
        self.runtime = runtime
        # Seen items of these event types are not recommended again (INTEREST_EXCLUDE_SEEN_TYPES;
        # streams/seen_items.py); None: every type, which needs no look at the types.
        self.exclude_seen_types = (
            None if set(EVENT_TYPES) <= set(exclude_seen_types) else frozenset(exclude_seen_types)
        )
        # > 0: each recommended item carries the user's events that drove it (streams/explain.py)
        self.explain_events = explain_events
        self.inputs = ModelInputs.of(runtime)
        self._empty = runtime.initial_state(1)
        self.cache = StateSlab(self._empty, cache_users)
        # The items ranked: the model's, then the catalogue's it does not know (re-read when
        # the file changes; each batch takes the table of its start).
        self.items = CatalogueWatch(runtime, catalogue, catalogue_poll_seconds)
        self.catalogue = Catalogue(runtime.version, long_tail(runtime.item_counts))
        # How the model reads events (a model trained without types/timestamps gets defaults).
        self._type_index = self.inputs.type_index
        self._use_gaps = self.inputs.use_gaps

    @property
    def model_version(self) -> str:
        return self.runtime.version

    def drop_cache(self) -> None:
        """Forget every cached state (their rows zeroed)."""
        self.cache.forget(list(self.cache.rows))

    # ------------------------------------------------------------------ features

    def _features(self, window: Sequence[WindowEntry]) -> tuple[np.ndarray, ...]:
        """(items, types, gaps) of a window, oldest first, as the model was trained on them."""
        items, types, stamps = features(self.runtime, self.inputs, window)
        buckets = window_gaps(stamps.tolist(), self.runtime.n_time_buckets, self._use_gaps)
        return items, types, np.array(buckets, np.int64)

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
        version = self.runtime.version
        per_user = requests_by_user(batch.requests)
        # Forgotten users with events after the forget start afresh below (their prior
        # signature matches no cached state); the others' states go now.
        self.cache.forget(u for u in batch.forgotten if u not in per_user)
        users = list(per_user)
        cached_items = self.cache.hits(users, version, batch.prior_signatures)
        rows = self.cache.check_out(users)
        try:
            result, final_items = self._recommend(batch, per_user, users, rows, cached_items)
        except BaseException:
            self.cache.release(rows)  # no entry may claim a half-stepped state
            raise
        final_signatures = [batch.final_signatures[u] for u in users]
        self.cache.check_in(users, rows, version, final_signatures, final_items)
        return result

    def _recommend(
        self,
        batch: Batch,
        per_user: Mapping[str, list[int]],
        users: list[str],
        rows: np.ndarray,
        cached_items: Mapping[str, np.ndarray],
    ) -> tuple[Result, list[np.ndarray]]:
        """The batch on the users' checked-out slab rows (``rows[i]`` is ``users[i]``'s;
        ``cached_items``: the cache hits' window items): the result and each user's window
        items to cache."""
        rt = self.runtime
        requests = batch.requests
        table = self.items.current()
        row_of = dict(zip(users, rows.tolist(), strict=True))
        others = [u for u in users if u not in cached_items]
        event_items = rt.index_of([r.event.item_id for r in requests])  # once per batch
        self._start_states(batch, others, row_of)
        vectors, memories = self._step_rounds(requests, per_user, row_of, event_items)
        prior_items = prior_window_items(rt, users, others, cached_items, batch.prior_windows)
        request_user, rank = request_ranks(requests, users)
        typed = self._typed_exclusion(requests, users, batch)
        exclude, known = seen_matrix(prior_items, request_user, rank, per_user, event_items, *typed)
        extra = seen_extra(
            table,
            requests,
            per_user,
            users,
            prior_items,
            batch.prior_windows,
            event_items,
            self.exclude_seen_types,
        )
        if extra is not None:  # catalogue items the users met: the model's indices lack them
            exclude = np.concatenate([exclude, extra], axis=1)
        recommendations, exposure = self._recommendations(batch, vectors, exclude, known, table)
        if self.explain_events:
            recommendations = self._explained(requests, recommendations, memories)
        final_items = window_items_after(rt, requests, per_user, prior_items, event_items)
        updates = model_updates(users, self.cache.states, rows, rt.version)
        return Result(recommendations, updates, exposure), final_items

    def _typed_exclusion(
        self, requests: Sequence[Request], users: Sequence[str], batch: Batch
    ) -> tuple[list[np.ndarray], np.ndarray] | tuple[()]:
        """``seen_matrix``'s arguments for the seen-items rule; none for the default rule."""
        if self.exclude_seen_types is None:
            return ()
        windows = [batch.prior_windows.get(u, ()) for u in users]
        return typed_exclusion(requests, windows, self.exclude_seen_types, self.runtime.index_of)

    def _start_states(self, batch: Batch, others: Sequence[str], row_of: Mapping[str, int]) -> None:
        """Write the start state of the users the cache missed into their slab rows (a hit's
        row holds it already): the empty state for a user without history, one batched rebuild
        for the rest."""
        fresh = [u for u in others if not batch.prior_windows.get(u)]
        missing = [u for u in others if batch.prior_windows.get(u)]
        if fresh:
            self.cache.put(np.array([row_of[u] for u in fresh], np.int64), self._empty)
        if missing:
            rebuilt = self._rebuild(
                [batch.prior_windows[u] for u in missing],
                [self._memory(batch.stored.get(u)) for u in missing],
            )
            self.cache.put(np.array([row_of[u] for u in missing], np.int64), rebuilt)

    def _step_rounds(
        self,
        requests: Sequence[Request],
        per_user: Mapping[str, list[int]],
        row_of: Mapping[str, int],
        event_items: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """One step per event, in place in the slab rows, batched across users round by round
        (a user's events must go in order, so round r takes each user's r-th event of the
        batch). Returns the vector after each request, and the memory after it where
        explanations need it (else None)."""
        slab = self.cache.states
        vectors = np.zeros((len(requests), self.runtime.d_model), np.float32)
        memories = (
            np.zeros((len(requests), *slab.memory.shape[1:]), slab.memory.dtype)
            if self.explain_events
            else None
        )
        rounds = max((len(indices) for indices in per_user.values()), default=0)
        for r in range(rounds):
            stepping, inserted, unknown = round_events(requests, per_user, row_of, event_items, r)
            if unknown:  # the state stays as it is; the vector is the one before the event
                vectors[[i for _, i in unknown]] = slab.vectors[[w for w, _ in unknown]]
            if stepping:
                vectors[[i for _, i in stepping]] = self._step(
                    slab, stepping, requests, event_items
                )
            if inserted:
                vectors[[i for _, i in inserted]] = self._reinsert(slab, inserted, requests)
            if memories is not None:
                done = stepping + inserted + unknown
                memories[[i for _, i in done]] = slab.memory[[w for w, _ in done]]
        return vectors, memories

    def _step(
        self,
        slab: EncoderStates,
        stepping: RoundEvents,
        requests: Sequence[Request],
        event_items: np.ndarray,
    ) -> np.ndarray:
        """One step of each of these events on its user's row, in place: the new vectors."""
        features = np.array(
            [self._event_features(requests[i], int(event_items[i])) for _, i in stepping],
            np.int64,
        )
        step_rows = np.array([w for w, _ in stepping], np.int64)
        return self.runtime.step_rows(
            slab, step_rows, features[:, 0], features[:, 1], features[:, 2]
        )

    def _reinsert(
        self, slab: EncoderStates, inserted: RoundEvents, requests: Sequence[Request]
    ) -> np.ndarray:
        """Rebuild the users of events that arrived out of time order from their windows, into
        their rows: the new vectors. Each memory (the events before, without this one) gets
        the event's share where it belongs in time (`export.explain.memory_with`)."""
        inserted_rows = np.array([w for w, _ in inserted], np.int64)
        memories = []
        for row, i in inserted:
            window = requests[i].window
            position = next(
                p for p, e in enumerate(window) if e.event_id == requests[i].event.event_id
            )
            items = self.runtime.index_of([entry.item_id for entry in window])
            memories.append(memory_with(self.runtime, items, position, slab.memory[row])[None])
        rebuilt = self._rebuild([requests[i].window for _, i in inserted], memories)
        self.cache.put(inserted_rows, rebuilt)
        return rebuilt.vectors

    def _recommendations(
        self,
        batch: Batch,
        vectors: np.ndarray,
        exclude: np.ndarray,
        known: np.ndarray,
        table: ItemTable,
    ) -> tuple[list[Recommendation], Exposure]:
        """Top-K of each request's vector over ``table`` with its seen items excluded; the
        popularity fallback where the model knows none of the user's items yet. With them,
        every recommended item as a table index (the exposure gauges count a catalogue item,
        past the model's, as one outside it: long tail)."""
        version = self.runtime.version
        top, scores = table.top_k(vectors, batch.k, exclude=exclude)
        names = table.names[top].tolist()  # (B, k) item ids, None for padding
        popular_seen: dict[str, set[str]] = {}
        recommendations = []
        for request, is_known, row_names, row_scores in zip(
            batch.requests, known.tolist(), names, scores.tolist(), strict=True
        ):
            if is_known:
                if None in row_names:  # fewer than k items left to recommend: drop padding
                    row_scores = [s for n, s in zip(row_names, row_scores, strict=True) if n]
                    row_names = [n for n in row_names if n]
                recommendations.append(Recommendation(row_names, row_scores, version, "encoder"))
            else:
                recommendations.append(
                    popular_fallback(batch, request, popular_seen, version, self.exclude_seen_types)
                )
        return recommendations, self._exposure(top, known, recommendations)

    def _exposure(
        self, top: np.ndarray, known: np.ndarray, recommendations: list[Recommendation]
    ) -> Exposure:
        """The encoder's rows straight from top-k; the few fallback rows by their ids."""
        items = [top[known].ravel()]
        cold = np.flatnonzero(~known).tolist()
        if cold:
            names = [item for i in cold for item in recommendations[i].item_ids]
            items.append(self.runtime.index_of(names))
        return Exposure(self.catalogue, np.concatenate(items))

    def _because(self, request: Request, rec: Recommendation, memory: np.ndarray) -> list[Any]:
        """What drove each item of an encoder recommendation. A catalogue item (no model
        index) gets an empty list: the model's leave-one-out scores its own items only."""
        targets = self.runtime.index_of(rec.item_ids)
        model_items = targets > 0
        because: list[Any] = [[] for _ in rec.item_ids]
        if model_items.any():
            _, explained = explain_window(
                self.runtime,
                self.inputs,
                request.window,
                memory,
                targets[model_items],
                self.explain_events,
            )
            for position, reasons in zip(np.flatnonzero(model_items), explained, strict=True):
                because[position] = reasons
        return because

    def _explained(
        self,
        requests: Sequence[Request],
        recommendations: list[Recommendation],
        memories: np.ndarray | None,
    ) -> list[Recommendation]:
        """Each recommendation with what drove each item: the request's window and the memory
        after its event, through the model's leave-one-out (one rebuild per request)."""
        assert memories is not None
        out = []
        for i, (request, rec) in enumerate(zip(requests, recommendations, strict=True)):
            if rec.source != "encoder":
                because: list[Any] = [POPULAR] * len(rec.item_ids)
            else:
                because = self._because(request, rec, memories[i])
            out.append(msgspec.structs.replace(rec, because=because))
        return out


def requests_by_user(requests: Sequence[Request]) -> dict[str, list[int]]:
    """Each user's request indices, in batch order; users in order of their first request."""
    per_user: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        per_user.setdefault(request.event.user_id, []).append(index)
    return per_user


def round_events(
    requests: Sequence[Request],
    per_user: Mapping[str, list[int]],
    row_of: Mapping[str, int],
    event_items: np.ndarray,
    r: int,
) -> tuple[RoundEvents, RoundEvents, RoundEvents]:
    """Round ``r``'s events (each user's r-th of the batch), sorted by what they need: a step,
    a rebuild (inserted out of time order: a step only appends), or nothing (an item the model
    does not know)."""
    stepping: RoundEvents = []
    inserted: RoundEvents = []
    unknown: RoundEvents = []
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
    return stepping, inserted, unknown


def prior_window_items(
    rt: EncoderRuntime,
    users: Sequence[str],
    others: Sequence[str],
    cached_items: Mapping[str, np.ndarray],
    prior_windows: Mapping[str, Sequence[WindowEntry]],
) -> list[np.ndarray]:
    """Each user's window before the batch as model indices. A cache hit's come from the
    cache; only the ``others``' windows are mapped here, in one call (mapping every window
    each batch would cost O(window) per user)."""
    unmapped = [prior_windows.get(u, ()) for u in others]
    mapped = rt.index_of([entry.item_id for prior in unmapped for entry in prior])
    mapped_of = {}
    start = 0
    for user_id, prior in zip(others, unmapped, strict=True):
        mapped_of[user_id] = mapped[start : start + len(prior)]
        start += len(prior)
    return [cached_items[u] if u in cached_items else mapped_of[u] for u in users]


def popular_fallback(
    batch: Batch,
    request: Request,
    popular_seen: dict[str, set[str]],
    version: str,
    types: Collection[str] | None = None,
) -> Recommendation:
    """The popular items the user has not seen, for a user the model knows nothing of yet.
    ``popular_seen`` keeps each such user's seen item ids across its requests in the batch;
    ``types``: only items of events of these types count as seen (None: every type)."""
    user_id = request.event.user_id
    seen_names = popular_seen.setdefault(
        user_id,
        {
            e.item_id
            for e in batch.prior_windows.get(user_id, ())
            if types is None or e.event_type in types
        },
    )
    if types is None or request.event.event_type in types:
        seen_names.add(request.event.item_id)
    return Recommendation.of(
        popular_unseen(batch.popular, seen_names, batch.k), version, "popularity"
    )


def window_items_after(
    rt: EncoderRuntime,
    requests: Sequence[Request],
    per_user: Mapping[str, list[int]],
    prior_items: Sequence[np.ndarray],
    event_items: np.ndarray,
) -> list[np.ndarray]:
    """Each user's window items after its last event, for the cache: the prior ones plus the
    batch's, less those trimmed off the front; an event inserted out of time order has the
    window mapped afresh."""
    final_items = []
    for indices, prior in zip(per_user.values(), prior_items, strict=True):
        window = requests[indices[-1]].window  # the window after the user's last event
        # One event (the common case): a slice, not an index array built from a list.
        new_items = (
            event_items[indices[0] : indices[0] + 1] if len(indices) == 1 else event_items[indices]
        )
        keep_prior = len(window) - len(new_items)  # of the prior items, the newest ones
        if 0 <= keep_prior <= len(prior) and all(requests[i].appended for i in indices):
            final_items.append(np.concatenate([prior[len(prior) - keep_prior :], new_items]))
        else:
            final_items.append(rt.index_of([entry.item_id for entry in window]))
    return final_items


def model_updates(
    users: Sequence[str], slab: EncoderStates, rows: np.ndarray, version: str
) -> dict[str, ModelUpdate]:
    """Each user's vector and memory after its last event, to persist beside its window."""
    # Serialised once for the batch and sliced per user: two tobytes() per user cost more.
    vector_rows = _rows_as_bytes(slab.vectors[rows])
    memory_rows = _rows_as_bytes(slab.memory[rows])
    return {
        user_id: ModelUpdate(vector=vector_rows[i], memory=memory_rows[i], model_version=version)
        for i, user_id in enumerate(users)
    }


def _rows_as_bytes(array: np.ndarray) -> list[bytes]:
    """Each row of a (B, ...) array as float32 bytes, from one serialisation of the whole."""
    data = np.ascontiguousarray(array, np.float32).tobytes()
    size = len(data) // len(array) if len(array) else 0
    return [data[i : i + size] for i in range(0, len(data), size)] if size else []
