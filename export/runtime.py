"""Load an exported encoder bundle and run it with ONNX Runtime, onnx and numpy (no torch).

This is what the streaming worker imports, so it must never import torch (a test pins that).
The worker's loop per micro-batch (all calls are batched over users; one row per user):

    rt = EncoderRuntime.load(bundle_dir)        # verifies every checksum, picks CUDA or CPU
    idx = rt.index_of(item_ids)                 # unknown ids -> UNKNOWN (-1), never an error
    # cache miss: rebuild from the user's window (oldest first) + persisted memory (or None)
    vectors, states = rt.rebuild(win_items, win_types, win_gaps, memory=[m_or_None, ...])
    # one event per user, constant cost (users with an UNKNOWN item are skipped); the worker
    # uses step_rows on its slab's rows of the users with a known item instead (in place)
    vectors, states = rt.step(states, items, types, gaps)
    top, scores = rt.top_k(vectors, k, exclude=[seen item indices per user])
    persist(states.memory)                      # (B, d): what rebuild() needs besides the window

Inputs are the model's: item indices (0 = padding, 1..n_items = ``rt.item_ids[i]``), event type
indices in ``rt.event_types`` order, and time-gap buckets (``encoder.features.time_gap_bucket``
with ``rt.n_time_buckets``). ONNX Runtime sessions are thread-safe, so the calls can run in a
worker thread off the event loop.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.scoring import PADDING, TopKScorer
from export.slab_attention import attend_in_place

log = logging.getLogger(__name__)

# The state of a cache's ring position, last in the step state (export/graphs.py).
RING_STATE = "ring"
SLOT_AXIS = 2  # the cached-event axis of the attention caches
# 2: ring-buffer step state (export/graphs.py); 3: the step's stages and attention biases
BUNDLE_FORMAT = "interest-bundle/3"
ATTENTION_BIAS_FILE = "attention_bias.npy"
MANIFEST = "manifest.json"
# Sentinel index_of() returns for an item id the model has never seen.
UNKNOWN = -1


def slot_index(rows: np.ndarray, slots: np.ndarray, axis: int) -> tuple[object, ...]:
    """Index of one slot per row (``slots[i]`` of row ``rows[i]``) on a cache's slot axis:
    ``cache[slot_index(rows, slots, axis)]`` is (len(rows), ...) without that axis."""
    return (rows, *(slice(None),) * (axis - 1), slots)


class BundleError(Exception):
    """The bundle is missing, incomplete or corrupted; the message says which file and why."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _as_index_rows(rows: Sequence[Sequence[int]] | np.ndarray) -> list[np.ndarray]:
    if isinstance(rows, np.ndarray) and rows.ndim == 2:
        return [np.asarray(r, dtype=np.int64) for r in rows]
    return [np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]


def _cuda_device_count() -> int:
    """CUDA devices visible through the driver API (no torch); 0 when there is no driver.

    Why not ``ort.get_available_providers()``: onnxruntime-gpu lists CUDAExecutionProvider
    on machines without any GPU, and ``ort.get_device()`` says "GPU" there too.
    """
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    try:
        if lib.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    except (AttributeError, OSError):
        return 0


def choose_providers(device: str = "auto") -> list[str]:
    """Execution providers to ask for: CUDA first when usable, always CPU as the fallback."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "cpu":
        return ["CPUExecutionProvider"]
    cuda_listed = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" or (cuda_listed and _cuda_device_count() > 0):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(intra_op_threads: int | None = None, spin: bool = False) -> ort.SessionOptions:
    """Full graph optimisation and a small intra-op pool.

    Why these: the worker runs inference in a thread beside its event loop, which needs a
    core for Kafka I/O; a bounded pool that does not spin between runs (spinning would burn
    that core while the loop waits on the broker) leaves it free. ``spin=True`` cut ~0.1 ms
    off a batch-1 step here when cores were free, and made calls 2-3x slower when they were
    shared with other processes (bench/README.md).
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = intra_op_threads or max(1, min(4, os.cpu_count() or 1))
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 3
    return so


@dataclass
class EncoderStates:
    """Incremental encoder state for a batch of users: numpy arrays with the user on axis 0.

    ``arrays`` holds the graph's state tensors by name, as listed in the bundle manifest
    (``keys_<layer>``/``values_<layer>`` attention caches of the last span-1 events, ring
    buffers; ``memory`` the long-term memory; ``ring`` each user's oldest slot, where the next
    event goes; export/graphs.py has the layout); ``vectors`` is each user's latest interest
    vector (zeros before any event), kept so a skipped event can return it.
    """

    arrays: dict[str, np.ndarray]
    vectors: np.ndarray  # (B, d) float32

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.vectors.nbytes + sum(a.nbytes for a in self.arrays.values()))

    @property
    def memory(self) -> np.ndarray:
        """(B, d) long-term memory after each user's last event: persist it beside the window,
        and pass it back to ``EncoderRuntime.rebuild`` to restore the state exactly."""
        return self.arrays["memory"]

    @classmethod
    def stack(cls, states: Sequence[EncoderStates]) -> EncoderStates:
        if not states:
            raise ValueError("stack() needs at least one state")
        names = states[0].arrays.keys()
        return cls(
            arrays={n: np.concatenate([s.arrays[n] for s in states], axis=0) for n in names},
            vectors=np.concatenate([s.vectors for s in states], axis=0),
        )

    def take(self, rows: Sequence[int] | np.ndarray) -> EncoderStates:
        """A copy of some users' rows (fancy indexing copies, so no batch buffer is kept alive)."""
        idx = np.asarray(rows, dtype=np.int64)
        return EncoderStates(
            arrays={n: a[idx] for n, a in self.arrays.items()}, vectors=self.vectors[idx]
        )

    def split(self) -> list[EncoderStates]:
        """One independent batch-1 state per user, for a per-user cache."""
        return [self.take([i]) for i in range(len(self))]


class StagedStep:
    """step.onnx cut at its attention reads (export/graphs.py's StepStage, one graph per
    stage), with the attention run in place on the caches (export/slab_attention.py): the
    worker's step, on rows of its slab of cached users, with no gather of their states."""

    def __init__(self, stages: list[ort.InferenceSession], attention_bias: np.ndarray) -> None:
        if attention_bias.shape[0] != len(stages) - 1:
            raise ValueError(f"{len(stages)} stages for {attention_bias.shape[0]} layers")
        self.stages = stages
        self.stage_inputs = [[i.name for i in stage.get_inputs()] for stage in stages]
        self.attention_bias = attention_bias  # (n_layers, span, H)

    @classmethod
    def load(
        cls,
        path: Path,
        stage_files: Sequence[str],
        so: ort.SessionOptions,
        providers: Sequence[str],
    ) -> StagedStep:
        bias = np.load(path / ATTENTION_BIAS_FILE, allow_pickle=False)
        if bias.dtype != np.float32 or bias.ndim != 3 or bias.shape[0] != len(stage_files) - 1:
            raise BundleError(
                f"{path}: {ATTENTION_BIAS_FILE} is {bias.dtype} {bias.shape}"
                f" for {len(stage_files)} step stages"
            )
        stages = [ort.InferenceSession(str(path / f), so, providers=providers) for f in stage_files]
        return cls(stages, bias)

    def run(
        self,
        states: EncoderStates,
        rows: np.ndarray,
        items: np.ndarray,
        types: np.ndarray,
        gaps: np.ndarray,
    ) -> np.ndarray:
        """One event for each of ``rows`` (int64, no repeats; items known), in place in
        ``states`` (caches ``keys_<i>``/``values_<i>``, ``memory``, ``ring``, vectors).
        Returns the vectors (len(rows), d)."""
        arrays = states.arrays
        ring = arrays[RING_STATE]
        n_layers = len(self.stages) - 1
        feeds = {
            "items": items,
            "types": np.asarray(types, dtype=np.int64),
            "gaps": np.asarray(gaps, dtype=np.int64),
        }
        x, query, key, value = self._run(0, feeds)
        attended = np.empty_like(query)
        for layer in range(n_layers):
            keys, values = arrays[f"keys_{layer}"], arrays[f"values_{layer}"]
            bias = self.attention_bias[layer]
            attend_in_place(query, key, value, keys, values, rows, ring, bias, attended)
            feeds.update(x=x, y=attended)
            if layer + 1 < n_layers:
                x, query, key, value = self._run(layer + 1, feeds)
        feeds["memory"] = arrays["memory"][rows]
        vector, memory = self._run(n_layers, feeds)
        arrays["memory"][rows] = memory
        ring[rows] = (ring[rows] + 1) % arrays["keys_0"].shape[SLOT_AXIS]
        states.vectors[rows] = vector
        return vector

    def _run(self, index: int, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one stage on the feeds it takes (the exporter drops unused inputs)."""
        names = self.stage_inputs[index]
        return self.stages[index].run(None, {name: feeds[name] for name in names})


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
        staged: StagedStep,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self.version: str = manifest["version"]
        self.receptive_field: int = int(manifest["receptive_field"])
        self.d_model: int = int(manifest["d_model"])
        self.state_names: list[str] = [s["name"] for s in manifest["state"]]
        self._step_inputs: list[str] = manifest["graphs"]["step"]["inputs"]
        # step.onnx returns, per cache (a ring buffer on its slot axis), only the new slot to
        # write at the ring position; the ring itself is the last state (export/graphs.py).
        # Cache state name -> its slot axis.
        self.ring_caches: dict[str, int] = {
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
        self._full = full
        self._step = step
        self._scorer = scorer
        self._staged = staged
        # The provider the sessions actually run on (ORT silently falls back to CPU).
        self.provider: str = step.get_providers()[0]
        no_event = np.zeros((1, 1), np.int64)
        self._empty_state = self._run_full(no_event, no_event, no_event, None)
        # compiles the in-place attention (cached on disk by numba after the first time)
        self.step_rows(self.initial_state(1), [0], np.ones(1, np.int64), no_event[0], no_event[0])

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        intra_op_threads: int | None = None,
        spin: bool = False,
    ) -> EncoderRuntime:
        """Verify the bundle's checksums, then open it. Raises BundleError on any mismatch.

        device: "auto" (CUDA when a GPU and the CUDA provider's libraries are usable, else
        CPU), "cuda" (ask for CUDA, fall back to CPU with a warning) or "cpu".
        """
        path = Path(path)
        manifest = verify_bundle(path)
        files = manifest["files"]
        stage_files = [stage["file"] for stage in manifest["graphs"].get("stages", [])]
        needed = ("full.onnx", "step.onnx", "items.json", "item_embeddings.npy")
        for name in (*needed, ATTENTION_BIAS_FILE, *stage_files):
            if name not in files:
                raise BundleError(f"{path}: manifest lists no {name}")
        item_ids = json.loads((path / "items.json").read_text())
        emb = np.load(path / "item_embeddings.npy", allow_pickle=False).astype(np.float32)
        if len(item_ids) != emb.shape[0] or emb.shape[1] != int(manifest["d_model"]):
            raise BundleError(
                f"{path}: items.json has {len(item_ids)} entries but item_embeddings.npy "
                f"is {emb.shape}"
            )
        providers = choose_providers(device)
        so = session_options(intra_op_threads, spin)
        try:
            full = ort.InferenceSession(str(path / "full.onnx"), so, providers=providers)
            step = ort.InferenceSession(str(path / "step.onnx"), so, providers=providers)
            scorer = TopKScorer(emb, so, providers)
            staged = StagedStep.load(path, stage_files, so, providers)
        except BundleError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"{path}: cannot load ONNX graph: {exc}") from exc
        try:
            # runs full.onnx once
            rt = cls(path, manifest, item_ids, emb, full, step, scorer, staged)
        except Exception as exc:
            raise BundleError(f"{path}: full.onnx does not run: {exc}") from exc
        if providers[0] != rt.provider:
            log.warning("asked for %s, running on %s", providers[0], rt.provider)
        log.info("loaded bundle %s version %s on %s", path, rt.version, rt.provider)
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
            target, axis = states.arrays[name], self.ring_caches.get(name)
            if axis is None:  # memory, ring: replaced
                target[index] = out
            else:  # a cache: the new slot at the ring position
                target[slot_index(index, ring, axis)] = out.take(0, axis=axis)
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
        """``step_in_place`` on ``rows`` of a large state (the worker's slab of cached users)
        without gathering them: the step's stages run on the events alone and the attention
        reads and writes each row's caches where they lie (export/slab_attention.py).

        ``rows`` must not repeat and every item must be known (index >= 1). Returns the
        vectors after the events (``states.vectors`` is updated too). Reference:
        ``step_in_place`` (step.onnx), compared in tests/export/test_parity.py.
        """
        index = np.asarray(rows, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if (items <= 0).any():
            raise ValueError("step_rows() needs known items (index >= 1)")
        if len(np.unique(index)) != len(index):
            raise ValueError("step_rows() needs each row at most once")
        return self._staged.run(states, index, items, types, gaps)

    def top_k(
        self,
        vectors: np.ndarray,
        k: int,
        exclude: Sequence[Sequence[int] | np.ndarray] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best k items per user by dot product, padding and ``exclude[b]`` (seen items) removed
        (``exclude``: one list per user, or a (B, W) matrix of them padded with 0).

        Returns (indices (B, k) int64, scores (B, k) float32), best first. Where fewer than k
        items remain, the tail has index 0 and score -inf. Runs export/scoring.py's graph;
        reference: ``top_k_reference``.
        """
        return self._scorer.top_k(vectors, k, exclude)

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


def _has_memory(memory: np.ndarray | Sequence[np.ndarray | None] | None, batch: int) -> np.ndarray:
    if memory is None:
        return np.zeros(batch, dtype=bool)
    if isinstance(memory, np.ndarray):
        return np.ones(batch, dtype=bool)
    if len(memory) != batch:
        raise ValueError("memory needs one entry (array or None) per user")
    return np.array([m is not None for m in memory], dtype=bool)


def top_k_reference(
    scores: np.ndarray, k: int, exclude: Sequence[Sequence[int]] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Plain reference for top_k: sort every item, walk the list, skip masked ones."""
    out_i, out_s = [], []
    for b, row in enumerate(np.asarray(scores, dtype=np.float32)):
        banned = {PADDING} | {int(x) for x in (exclude[b] if exclude is not None else [])}
        ranked = [int(j) for j in np.argsort(-row, kind="stable") if int(j) not in banned][:k]
        pad = k - len(ranked)
        out_i.append(ranked + [PADDING] * pad)
        out_s.append([float(row[j]) for j in ranked] + [-np.inf] * pad)
    return np.array(out_i, dtype=np.int64), np.array(out_s, dtype=np.float32)


def verify_bundle(path: Path) -> dict[str, Any]:
    """Read the manifest and check every listed file's sha256; return the manifest."""
    mpath = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle directory")
    if not mpath.is_file():
        raise BundleError(f"{path}: no {MANIFEST}; is this an `interest export` bundle?")
    try:
        manifest = json.loads(mpath.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{mpath}: not valid JSON ({exc})") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{mpath}: format {manifest.get('format')!r}, expected {BUNDLE_FORMAT}"
            " (export the model again with `interest export`)"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{mpath}: no file checksums")
    for name, digest in sorted(files.items()):
        fpath = path / name
        if not fpath.is_file():
            raise BundleError(f"{path}: incomplete bundle, {name} is missing")
        actual = sha256_file(fpath)
        if actual != digest:
            raise BundleError(
                f"{path}: checksum mismatch for {name} (corrupted or modified after export)"
            )
    if content_version(files) != manifest.get("version"):
        raise BundleError(f"{mpath}: version does not match the file checksums")
    if manifest_digest(manifest) != manifest.get("manifest_sha256"):
        raise BundleError(f"{mpath}: manifest was modified after export (manifest_sha256)")
    return manifest


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own digest field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def content_version(files: dict[str, str]) -> str:
    """Bundle version: a hash of every file's checksum, so equal content gives equal version."""
    h = hashlib.sha256()
    for name, digest in sorted(files.items()):
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()[:16]
