"""Items from the catalogue in the stream: new items become rankable without retraining.

``INTEREST_CATALOGUE`` names a content vectors file (`interest catalogue --out`, read by
encoder/catalogue_vectors.py). The items in it that the serving model does not know get an
embedding through the bundle's content map (export/runtime.py ``project``) and are ranked with
the model's own: the top-k scorer holds the model's table and then theirs, so such an item has
a table index past ``n_items`` and ``ItemTable.names`` maps it back to its id. Its score is the
user's vector dotted with its projected embedding; under the popularity penalty it counts as
an item with no training events.

What the catalogue does not change: an event on such an item cannot be fed to the model (the
step graph has no row for it), so it leaves the user's state as it is, like any item the model
does not know; it is still excluded from the user's recommendations. Items neither the model
nor the catalogue knows are never recommended by the encoder.

The file is read when the recommender starts (with each model rollout) and again whenever it
changes: ``CatalogueWatch`` checks it at most every ``model_poll_seconds`` from the batch path
(one ``stat``), loads a changed file in a thread of its own, and swaps the new table in at the
start of a later batch, so no batch waits for a load and none runs half on either table. A file
that fails to load is logged and the previous table keeps serving until the file changes again.

Numpy and ONNX Runtime only: the worker imports this module.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import UserError
from encoder.catalogue_vectors import load_catalogue_vectors
from export.bundle_format import content_map_info
from export.runtime import UNKNOWN, EncoderRuntime
from streams.recommend import Request
from streams.window import WindowEntry

log = logging.getLogger(__name__)

TopK = Callable[..., tuple[np.ndarray, np.ndarray]]
Stamp = tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class ItemTable:
    """The items the encoder ranks: the model's (indices 1..n_items), then the catalogue's
    items the model does not know (n_items + 1 ...)."""

    names: np.ndarray  # object array: table index -> item id, None at the padding
    top_k: TopK  # (vectors, k, exclude) -> (table indices, scores), as EncoderRuntime.top_k
    # item id -> table index, for the catalogue's items only
    extra: Mapping[str, int] = field(default_factory=dict)
    extra_embeddings: np.ndarray | None = None  # (len(extra), d) their projected embeddings

    def extra_index_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """Table indices of catalogue-only items; 0 for any other id."""
        get = self.extra.get
        return np.fromiter((get(item, 0) for item in item_ids), np.int64, len(item_ids))


def model_items(runtime: EncoderRuntime) -> ItemTable:
    """The model's items alone: what the worker ranks without a catalogue."""
    return ItemTable(np.array(runtime.item_ids, dtype=object), runtime.top_k)


def catalogue_items(runtime: EncoderRuntime, path: Path) -> ItemTable:
    """The model's items and, after them, the catalogue's items it does not know, projected.
    ValueError (or OSError) when the file cannot serve this bundle."""
    vectors = load_catalogue_vectors(path)
    info = content_map_info(runtime.manifest)
    if info is None:
        raise ValueError(f"the bundle {runtime.path} has no content map")
    if vectors.encoder != info["encoder"]:
        raise ValueError(
            f"{path} holds vectors of {vectors.encoder!r}, the bundle's content map maps from "
            f"{info['encoder']!r}: run `interest catalogue` again"
        )
    new = np.flatnonzero(runtime.index_of(vectors.item_ids) == UNKNOWN)
    if not len(new):
        return model_items(runtime)
    ids = [vectors.item_ids[i] for i in new]
    embeddings = runtime.project(vectors.vectors[new])
    scorer = runtime.scorer_with(embeddings)
    first = runtime.n_items + 1
    return ItemTable(
        np.array([*runtime.item_ids, *ids], dtype=object),
        scorer.top_k,
        {item: first + j for j, item in enumerate(ids)},
        embeddings,
    )


def _stamp(path: Path) -> Stamp | None:
    """Identity of the file the path names now (a rename over it changes the inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class CatalogueWatch:
    """The item table of one runtime, following the catalogue file as it changes."""

    def __init__(self, runtime: EncoderRuntime, path: Path | None, poll_seconds: float) -> None:
        if path is not None and runtime.content_map is None:
            raise UserError(
                f"INTEREST_CATALOGUE is set but the bundle {runtime.path} has no content map:"
                " run `interest catalogue --model DIR` on its model directory, then export it"
            )
        self.runtime = runtime
        self.path = path
        self.poll_seconds = poll_seconds
        self._table = model_items(runtime)
        self._stamp: Stamp | None = None  # of the file the table came from (or was refused)
        self._next_check = 0.0
        self._loading: Future[ItemTable] | None = None
        self._loading_stamp: Stamp | None = None
        self._lock = threading.Lock()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="catalogue-load")
        if path is not None:  # at start, the catalogue as it is now
            stamp = _stamp(path)
            if stamp is not None:
                self._finish(stamp, self._load)

    def current(self) -> ItemTable:
        """The table for the next batch: a finished load swapped in, and a load started when
        the file changed (checked at most every poll_seconds). Never waits for a load."""
        if self.path is None:
            return self._table
        with self._lock:
            loading = self._loading
            if loading is not None and loading.done():
                self._loading = None
                self._finish(self._loading_stamp, loading.result)
            now = time.monotonic()
            if self._loading is None and now >= self._next_check:
                self._next_check = now + self.poll_seconds
                stamp = _stamp(self.path)
                if stamp is not None and stamp != self._stamp:
                    self._loading_stamp = stamp
                    self._loading = self._loader.submit(self._load)
            return self._table

    def _load(self) -> ItemTable:
        assert self.path is not None
        return catalogue_items(self.runtime, self.path)

    def _finish(self, stamp: Stamp | None, result: Callable[[], ItemTable]) -> None:
        """Take a load's table, or log why there is none; either way the file as of ``stamp``
        is done with until it changes."""
        self._stamp = stamp
        try:
            table = result()
        except Exception as exc:  # whatever is wrong with the file, the last table serves on
            log.error("catalogue %s refused, still ranking the items before it: %s", self.path, exc)
            return
        self._table = table
        log.warning(
            "catalogue %s: %d items the model does not know are ranked from their content",
            self.path,
            len(table.extra),
        )

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)


def seen_extra(
    table: ItemTable,
    requests: Sequence[Request],
    per_user: Mapping[str, Sequence[int]],
    users: Sequence[str],
    prior_items: Sequence[np.ndarray],
    prior_windows: Mapping[str, Sequence[WindowEntry]],
    event_items: np.ndarray,
    types: Collection[str] | None = None,
) -> np.ndarray | None:
    """(requests, E) table indices of the catalogue-only items each request's user has met so
    far (its window before the batch, then its batch events up to its own), 0-padded; None
    when no request has any. The model's indices leave these items out (UNKNOWN), so the
    seen-items matrix cannot exclude them by itself. ``types``: only events of these types
    count (the seen-items rule, streams/seen_items.py); None: every type.

    ``prior_items[u]``: the model indices of ``users[u]``'s window before the batch, aligned
    with ``prior_windows``; ``event_items``: each request's event item as a model index.
    Only positions the model does not know are looked at: none, in the common case.
    """
    if not table.extra:
        return None
    lengths = np.array([len(p) for p in prior_items], np.int64)
    flat = np.concatenate(prior_items) if len(prior_items) else np.zeros(0, np.int64)
    unknown = np.flatnonzero(flat < 0)
    unknown_events = np.flatnonzero(event_items < 0)
    if not len(unknown) and not len(unknown_events):
        return None
    starts = np.cumsum(lengths) - lengths
    met: dict[str, list[int]] = {}
    for position in unknown.tolist():
        u = int(np.searchsorted(starts, position, side="right")) - 1
        entry = prior_windows.get(users[u], ())[position - starts[u]]
        index = table.extra.get(entry.item_id, 0)
        if index and (types is None or entry.event_type in types):
            met.setdefault(users[u], []).append(index)
    new_events = {int(i) for i in unknown_events}
    affected = set(met) | {requests[i].event.user_id for i in new_events}
    rows: list[list[int]] = [[] for _ in requests]
    for user_id in affected:
        so_far = list(met.get(user_id, ()))
        for index in per_user[user_id]:
            event = requests[index].event
            if index in new_events and (types is None or event.event_type in types):
                extra = table.extra.get(event.item_id, 0)
                if extra:
                    so_far.append(extra)
            rows[index] = list(so_far)
    width = max((len(r) for r in rows), default=0)
    if not width:
        return None
    out = np.zeros((len(requests), width), np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
