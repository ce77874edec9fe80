"""Load an exported encoder bundle and run it with ONNX Runtime, onnx and numpy (no torch).

This is what the streaming worker imports, so it must never import torch (a test pins that).
Its public surface is ``__all__``; the worker's loop per micro-batch (all calls are batched
over users; one row per user):

    rt = EncoderRuntime.load(bundle_dir)        # verifies every checksum, picks CUDA or CPU
                                                # and the step's form for it (rt.step_mode)
    idx = rt.index_of(item_ids)                 # unknown ids -> UNKNOWN (-1), never an error
    slab = rt.initial_state(n)                  # users with no history yet
    # cache miss: rebuild from the user's window (oldest first) + persisted memory (or None)
    vectors, states = rt.rebuild(win_items, win_types, win_gaps, memory=[m_or_None, ...])
    # one event per user, in place on rows of the worker's slab (items known, rows distinct)
    vectors = rt.step_rows(slab, rows, items, types, gaps)
    top, scores = rt.top_k(vectors, k, exclude=[seen item indices per user])
    rt.ids_of(top[b])                           # model indices -> item ids
    persist(states.memory)                      # (B, d): what rebuild() needs besides the window

Items the model does not know can still be ranked when the bundle has a content map:
``rt.project(content_vectors)`` gives them embeddings, and ``rt.scorer_with(embeddings)`` a
top-k scorer over the model's items and those after them (streams/catalogue.py).

``step`` (a copy, users with an UNKNOWN item skipped) and ``step_in_place`` (step.onnx) do the
same step as ``step_rows`` and are its references. Inputs are the model's: item indices
(0 = padding, 1..n_items = ``rt.item_ids[i]``), event type indices in ``rt.event_types`` order,
and time-gap buckets (``encoder.features.time_gap_bucket`` with ``rt.n_time_buckets``). ONNX
Runtime sessions are thread-safe, so the calls can run in a worker thread off the event loop.
The bundle's layout and its verification are export/bundle_format.py's.

What runs where: the worker's state slab lives in host memory, and ``rebuild`` (full.onnx) and
``top_k`` (the scoring graph) are whole graphs on the sessions' provider. ``step_rows`` has two
forms (``step_mode``, chosen by export/sessions.py's ``choose_step_mode``): on the CPU,
"staged" runs the step's stage graphs with the attention read in place in the slab by a numba
kernel, so no user's caches are copied; on a GPU that host kernel would sit between device
graphs at every layer, each layer a copy out, a wait and a copy back while the device idles,
so "graph" gathers the rows' state, runs step.onnx whole on the device and scatters the new
slots back: one round trip per call and the attention on the device too, for the copy of the
rows' caches in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from encoder.content_map import project
from encoder.popularity import popularity_bias
from export.bundle_format import (
    CONTENT_MAP_FILE,
    FULL_GRAPH_FILE,
    ITEM_COUNTS_FILE,
    ITEM_EMBEDDINGS_FILE,
    ITEMS_FILE,
    RING_STATE,
    STEP_GRAPH_FILE,
    BundleError,
    content_map_info,
    stage_files_listed,
    verify_bundle,
)
from export.scoring import TopKScorer, top_k_reference
from export.sessions import check_step_mode, choose_providers, choose_step_mode, session_options
from export.staged_step import StagedStep
from export.states import EncoderStates

__all__ = [
    "UNKNOWN",
    "BundleError",
    "EncoderRuntime",
    "EncoderStates",
    "choose_providers",
    "session_options",
    "top_k_reference",
]

log = logging.getLogger(__name__)

# Sentinel index_of() returns for an item id the model has never seen.
UNKNOWN = -1


def _slot_index(rows: np.ndarray, slots: np.ndarray, axis: int) -> tuple[object, ...]:
    """Index of one slot per row (``slots[i]`` of row ``rows[i]``) on a cache's slot axis:
    ``cache[_slot_index(rows, slots, axis)]`` is (len(rows), ...) without that axis."""
    return (rows, *(slice(None),) * (axis - 1), slots)


def _as_index_rows(rows: Sequence[Sequence[int]] | np.ndarray) -> list[np.ndarray]:
    if isinstance(rows, np.ndarray) and rows.ndim == 2:
        return [np.asarray(r, dtype=np.int64) for r in rows]
    return [np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]


class EncoderRuntime:
    """One loaded bundle: the full and step ONNX sessions, item vocabulary and embeddings."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        item_ids: list[str | None],
        item_embeddings: np.ndarray,
        full: ort.InferenceSession,
        step: ort.InferenceSession,
        scorer: TopKScorer,
        staged: StagedStep | None,
        item_counts: np.ndarray,
        score_bias: np.ndarray | None = None,
        content_map: np.ndarray | None = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.version: str = manifest["version"]
        self.receptive_field: int = int(manifest["receptive_field"])
        self.d_model: int = int(manifest["d_model"])
        self.state_names: list[str] = [s["name"] for s in manifest["state"]]
        self._step_inputs: list[str] = manifest["graphs"]["step"]["inputs"]
        # step.onnx returns, per cache (a ring buffer on its slot axis), only the new slot to
        # write at the ring position; the ring itself is the last state (bundle_format).
        # Cache state name -> its slot axis.
        self._ring_caches: dict[str, int] = {
            s["name"]: s["slot_axis"] for s in manifest["state"] if "slot_axis" in s
        }
        if self.state_names[-1] != RING_STATE:
            raise BundleError(f"{path}: the step state has no {RING_STATE!r} (re-export it)")
        self.event_types: list[str] = list(manifest.get("event_types", []))
        self.n_time_buckets: int = int(manifest["config"]["n_time_buckets"])
        # Index = model item index; item_ids[0] is None (padding).
        self.item_ids = item_ids
        self._index = {item: i for i, item in enumerate(item_ids) if item is not None}
        self.item_embeddings = item_embeddings  # (n_items + 1, d) float32, row 0 = padding
        self.item_counts = item_counts  # (n_items + 1,) int64 training events, 0 = padding
        self.score_bias = score_bias  # (n_items + 1,) the popularity penalty's, or None
        # (c + 1, d) content vector -> item embedding (encoder/content_map.py), or None; the
        # sentence model of its content space is content_map_info(manifest)["encoder"]
        self.content_map = content_map
        self._full = full
        self._step = step
        self._scorer = scorer
        self._staged = staged  # None: step_rows runs step.onnx whole ("graph")
        # The provider the sessions actually run on (ORT silently falls back to CPU).
        self.provider: str = step.get_providers()[0]
        self.step_mode: str = "graph" if staged is None else "staged"
        no_event = np.zeros((1, 1), np.int64)
        self._empty_state = self._run_full(no_event, no_event, no_event, None)
        # compiles the in-place attention (cached on disk by numba after the first time), or
        # sets up the device's kernels for step.onnx, before the first real event
        self.step_rows(self.initial_state(1), [0], np.ones(1, np.int64), no_event[0], no_event[0])

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        intra_op_threads: int | None = None,
        spin: bool = False,
        popularity_penalty: float = 0.0,
        step_mode: str = "auto",
    ) -> EncoderRuntime:
        """Verify the bundle's checksums, then open it. Raises BundleError on any mismatch.

        device: "auto" (CUDA when a GPU and the CUDA provider's libraries are usable, else
        CPU), "cuda" (ask for CUDA, fall back to CPU with a warning) or "cpu".
        popularity_penalty: re-ranks top_k() by encoder/popularity.py's ``popularity_bias``
        of the bundle's item counts (0: as trained).
        step_mode: how ``step_rows`` runs: "auto" ("graph" on a GPU, "staged" on the CPU,
        by the provider actually got), "staged" or "graph" (the module docstring says why).
        """
        check_step_mode(step_mode)
        path = Path(path)
        manifest = verify_bundle(path)
        item_ids = json.loads((path / ITEMS_FILE).read_text())
        emb = np.load(path / ITEM_EMBEDDINGS_FILE, allow_pickle=False).astype(np.float32)
        if len(item_ids) != emb.shape[0] or emb.shape[1] != int(manifest["d_model"]):
            raise BundleError(
                f"{path}: {ITEMS_FILE} has {len(item_ids)} entries but {ITEM_EMBEDDINGS_FILE} "
                f"is {emb.shape}"
            )
        counts = np.load(path / ITEM_COUNTS_FILE, allow_pickle=False).astype(np.int64)
        if counts.shape != (len(item_ids),):
            raise BundleError(f"{path}: {ITEM_COUNTS_FILE} is {counts.shape}, not one per item")
        bias = popularity_bias(counts, popularity_penalty) if popularity_penalty else None
        content_map = _load_content_map(path, manifest)
        providers = choose_providers(device)
        so = session_options(intra_op_threads, spin)
        try:
            full = ort.InferenceSession(str(path / FULL_GRAPH_FILE), so, providers=providers)
            step = ort.InferenceSession(str(path / STEP_GRAPH_FILE), so, providers=providers)
            scorer = TopKScorer(emb, so, providers, bias)
            mode = choose_step_mode(step_mode, step.get_providers()[0])
            # graph mode never runs the stages: their sessions would only hold device memory
            staged = (
                StagedStep.load(path, stage_files_listed(manifest), so, providers)
                if mode == "staged"
                else None
            )
        except BundleError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{path}: cannot load ONNX graph: {exc}") from exc
        try:
            # runs full.onnx once
            rt = cls(
                path, manifest, item_ids, emb, full, step, scorer, staged, counts, bias, content_map
            )
        except Exception as exc:
            raise BundleError(f"{path}: full.onnx does not run: {exc}") from exc
        if providers[0] != rt.provider:
            log.warning("asked for %s, running on %s", providers[0], rt.provider)
        log.info(
            "loaded bundle %s version %s on %s, step %s",
            path,
            rt.version,
            rt.provider,
            rt.step_mode,
        )
        return rt

    # ------------------------------------------------------------------ vocabulary

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    def index_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """Model indices of item ids (int64); ids not in the vocabulary give UNKNOWN (-1)."""
        get = self._index.get
        return np.fromiter((get(str(i), UNKNOWN) for i in item_ids), np.int64, len(item_ids))

    def ids_of(self, indices: Sequence[int] | np.ndarray) -> list[str | None]:
        return [self.item_ids[int(i)] if 0 < int(i) <= self.n_items else None for i in indices]

    # ------------------------------------------------------------------ inference

    def initial_state(self, batch: int) -> EncoderStates:
        """State of users with no history: what full.onnx makes of an empty window.

        Why not zeros: an empty cache slot is marked in the state itself (export/graphs.py),
        so only the graph knows what "empty" looks like.
        """
        empty = self._empty_state
        return EncoderStates(
            arrays={n: np.repeat(a, batch, axis=0) for n, a in empty.arrays.items()},
            vectors=np.zeros((batch, self.d_model), np.float32),
        )

    def rebuild(
        self,
        items: Sequence[Sequence[int]] | np.ndarray,
        types: Sequence[Sequence[int]] | np.ndarray,
        gaps: Sequence[Sequence[int]] | np.ndarray,
        memory: np.ndarray | Sequence[np.ndarray | None] | None = None,
    ) -> tuple[np.ndarray, EncoderStates]:
        """Rebuild users' states from their recent events (oldest first), one row per user.

        Rows may differ in length. Events with UNKNOWN (or padding) items are dropped; for
        users with a memory only the last ``receptive_field`` events matter and the rest are
        dropped too; then rows are left-padded into one batch.
        ``memory`` is each user's persisted long-term memory *after* their last event
        (``states.memory``), as a (B, d) array or a list with None for users without one;
        None (or a None entry) recomputes it from the given events, which is exact only when
        they are the user's whole history. The result is exact (same vector and state as
        stepping through the whole history) once the rows hold >= receptive_field events.
        Returns the vector after each user's last event and the state to continue from.
        """
        irows, trows, grows = _as_index_rows(items), _as_index_rows(types), _as_index_rows(gaps)
        if not (len(irows) == len(trows) == len(grows)):
            raise ValueError("items, types and gaps need one row per user")
        batch = len(irows)
        if batch == 0:
            return np.zeros((0, self.d_model), np.float32), self.initial_state(0)
        has_memory = _has_memory(memory, batch)
        kept = []
        for b, (i, t, g) in enumerate(zip(irows, trows, grows, strict=True)):
            if not (len(i) == len(t) == len(g)):
                raise ValueError("items, types and gaps rows must have equal lengths")
            known = i > 0
            # Without a persisted memory every event feeds the recomputed memory: keep them all.
            start = -self.receptive_field if has_memory[b] else 0
            kept.append((i[known][start:], t[known][start:], g[known][start:]))
        width = max(1, max((len(k[0]) for k in kept), default=0))
        arr = np.zeros((3, batch, width), dtype=np.int64)
        for b, (i, t, g) in enumerate(kept):
            n = len(i)
            if n:
                arr[0, b, -n:], arr[1, b, -n:], arr[2, b, -n:] = i, t, g
        states = self._run_full(arr[0], arr[1], arr[2], memory)
        return states.vectors.copy(), states

    def step(
        self,
        states: EncoderStates,
        items: Sequence[int] | np.ndarray,
        types: Sequence[int] | np.ndarray,
        gaps: Sequence[int] | np.ndarray,
    ) -> tuple[np.ndarray, EncoderStates]:
        """Add one event per user; cost does not depend on history length. ``states`` is left
        as it was (the new state is a copy; ``step_in_place`` and ``step_rows`` work in place).

        Users whose item is UNKNOWN (or padding) are skipped: their state comes back unchanged
        and their vector is their previous one.
        """
        it = np.asarray(items, dtype=np.int64).reshape(-1)
        ty = np.asarray(types, dtype=np.int64).reshape(-1)
        ga = np.asarray(gaps, dtype=np.int64).reshape(-1)
        if not (len(it) == len(ty) == len(ga) == len(states)):
            raise ValueError("step() needs one item, type and gap per user in states")
        out = states.take(np.arange(len(states)))
        rows = np.flatnonzero(it > 0)
        if len(rows):
            everyone = len(rows) == len(out)  # then no gather of the rows
            self.step_in_place(out, it[rows], ty[rows], ga[rows], None if everyone else rows)
        return out.vectors.copy(), out

    def step_in_place(
        self,
        states: EncoderStates,
        items: np.ndarray,
        types: np.ndarray,
        gaps: np.ndarray,
        rows: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Add one event to each of ``rows`` of ``states`` (all rows if None), in place.

        Every item must be known (index >= 1): step.onnx has no "keep the state" path. Each
        cache gets its new slot written at the user's ring position, so an event writes a few
        hundred floats per user instead of copying its whole state. Returns the vectors after
        the events, one per row (``states.vectors`` is updated too). Reference: ``step``'s
        graph outputs through export/graphs.py's ``next_state``, compared in
        tests/export/test_parity.py.
        """
        if (np.asarray(items) <= 0).any():
            # ONNX's Gather takes -1 (UNKNOWN) as the last row: a wrong state, silently.
            raise ValueError("step_in_place() needs known items (index >= 1); step() skips others")
        index = np.arange(len(states)) if rows is None else np.asarray(rows, dtype=np.int64)
        sub = states if rows is None else states.take(index)
        feeds = dict(
            zip(
                self._step_inputs,
                (items, types, gaps, *(sub.arrays[n] for n in self.state_names)),
                strict=True,
            )
        )
        vector, *outs = self._step.run(None, feeds)
        ring = sub.arrays[RING_STATE].copy()  # where this event's slots go
        for name, out in zip(self.state_names, outs, strict=True):
            target, axis = states.arrays[name], self._ring_caches.get(name)
            if axis is None:  # memory, ring: replaced
                target[index] = out
            else:  # a cache: the new slot at the ring position
                target[_slot_index(index, ring, axis)] = out.take(0, axis=axis)
        states.vectors[index] = vector
        return vector

    def step_rows(
        self,
        states: EncoderStates,
        rows: Sequence[int] | np.ndarray,
        items: np.ndarray,
        types: np.ndarray,
        gaps: np.ndarray,
    ) -> np.ndarray:
        """``step_in_place`` on ``rows`` of a large state (the worker's slab of cached users).

        "staged" (CPU): without gathering them: the step's stages run on the events alone and
        the attention reads and writes each row's caches where they lie
        (export/slab_attention.py). "graph" (GPU): ``step_in_place`` itself, step.onnx on the
        gathered rows in one device call (the module docstring says why).

        ``rows`` must not repeat and every item must be known (index >= 1). Returns the
        vectors after the events (``states.vectors`` is updated too). Reference:
        ``step_in_place`` (step.onnx), compared in tests/export/test_parity.py; the two modes
        in tests/export/test_devices.py.
        """
        index = np.asarray(rows, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        types = np.asarray(types, dtype=np.int64)
        gaps = np.asarray(gaps, dtype=np.int64)
        if (items <= 0).any():
            raise ValueError("step_rows() needs known items (index >= 1)")
        if len(np.unique(index)) != len(index):
            raise ValueError("step_rows() needs each row at most once")
        if self._staged is None:
            return self.step_in_place(states, items, types, gaps, rows=index)
        return self._staged.run(states, index, items, types, gaps)

    def top_k(
        self,
        vectors: np.ndarray,
        k: int,
        exclude: Sequence[Sequence[int] | np.ndarray] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best k items per user by dot product (plus the popularity penalty's bias when the
        bundle was loaded with one), padding and ``exclude[b]`` (seen items) removed
        (``exclude``: one list per user, or a (B, W) matrix of them padded with 0).

        Returns (indices (B, k) int64, scores (B, k) float32), best first. Where fewer than k
        items remain, the tail has index 0 and score -inf. Runs export/scoring.py's graph;
        reference: ``top_k_reference``.
        """
        return self._scorer.top_k(vectors, k, exclude)

    def project(self, content: np.ndarray) -> np.ndarray:
        """(N, c) content vectors -> (N, d) item embeddings through the bundle's content map;
        ValueError when the bundle has none or the vectors are of another size."""
        if self.content_map is None:
            raise ValueError(f"{self.path}: the bundle has no content map")
        if content.ndim != 2 or content.shape[1] != self.content_map.shape[0] - 1:
            raise ValueError(
                f"content vectors of shape {content.shape}, the content map takes "
                f"{self.content_map.shape[0] - 1} dimensions"
            )
        return project(self.content_map, content)

    def scorer_with(self, extra_embeddings: np.ndarray) -> TopKScorer:
        """A top-k scorer (``TopKScorer.top_k``, as ``top_k``) over the model's items and then
        ``extra_embeddings`` (M, d): indices n_items + 1 .. n_items + M are those rows. Same
        sessions' options and provider; under the popularity penalty an extra item counts as
        one with no training events, which leaves its score as it is."""
        table = np.concatenate([self.item_embeddings, np.asarray(extra_embeddings, np.float32)])
        bias = None
        if self.score_bias is not None:
            bias = np.concatenate([self.score_bias, np.zeros(len(extra_embeddings), np.float32)])
        session = self._scorer.session
        return TopKScorer(table, session.get_session_options(), session.get_providers(), bias)

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        """(B, n_items + 1) dot-product scores, as the model's item_scores()."""
        return np.asarray(vectors, dtype=np.float32) @ self.item_embeddings.T

    # ------------------------------------------------------------------ internals

    def _run_full(
        self,
        items: np.ndarray,
        types: np.ndarray,
        gaps: np.ndarray,
        memory: np.ndarray | Sequence[np.ndarray | None] | None,
    ) -> EncoderStates:
        batch = items.shape[0]
        has = _has_memory(memory, batch)
        mem = np.zeros((batch, self.d_model), dtype=np.float32)
        if isinstance(memory, np.ndarray):
            mem[:] = memory.reshape(batch, self.d_model)
        elif memory is not None:
            for b, m in enumerate(memory):
                if m is not None:
                    mem[b] = np.asarray(m, dtype=np.float32).reshape(self.d_model)
        feeds = {"items": items, "types": types, "gaps": gaps, "memory_in": mem, "has_memory": has}
        states = self._unpack(self._full.run(None, feeds))[1]
        # Users with no known event and no memory have no interest vector yet.
        states.vectors[~(items > 0).any(axis=1) & ~has] = 0.0
        return states

    def _unpack(self, outs: list[np.ndarray]) -> tuple[np.ndarray, EncoderStates]:
        arrays = dict(zip(self.state_names, outs[1:], strict=True))
        return outs[0], EncoderStates(arrays=arrays, vectors=outs[0])


def _load_content_map(path: Path, manifest: dict[str, Any]) -> np.ndarray | None:
    info = content_map_info(manifest)
    if info is None:
        return None
    weights = np.load(path / CONTENT_MAP_FILE, allow_pickle=False).astype(np.float32)
    expected = (int(info["content_dim"]) + 1, int(manifest["d_model"]))
    if weights.shape != expected:
        raise BundleError(f"{path}: {CONTENT_MAP_FILE} is {weights.shape}, not {expected}")
    return weights


def _has_memory(memory: np.ndarray | Sequence[np.ndarray | None] | None, batch: int) -> np.ndarray:
    if memory is None:
        return np.zeros(batch, dtype=bool)
    if isinstance(memory, np.ndarray):
        return np.ones(batch, dtype=bool)
    if len(memory) != batch:
        raise ValueError("memory needs one entry (array or None) per user")
    return np.array([m is not None for m in memory], dtype=bool)
