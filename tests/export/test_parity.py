"""ONNX vs torch, and incremental ONNX steps vs a full recompute (fast path vs reference)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder.model import InterestEncoder
from export.bundle_format import state_names
from export.graphs import from_graph_state, next_state, to_graph_state
from export.runtime import EncoderRuntime, EncoderStates

TOL = 1e-4


def _history(batch: int, length: int, n_items: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    items = rng.integers(1, n_items + 1, (batch, length))
    types = rng.integers(0, 4, (batch, length))
    gaps = rng.integers(0, 8, (batch, length))
    return items, types, gaps


def _left_pad(a: np.ndarray, lengths: list[int]) -> np.ndarray:
    out = np.zeros_like(a)
    for b, n in enumerate(lengths):
        if n:
            out[b, -n:] = a[b, -n:]
    return out


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _maxdiff(a: torch.Tensor | np.ndarray, b: np.ndarray) -> float:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def _oldest_first(runtime: EncoderRuntime, states: EncoderStates) -> dict[str, np.ndarray]:
    """The state with each ring-buffer cache rotated to oldest slot first (ring 0)."""
    graph = [torch.from_numpy(states.arrays[n]) for n in runtime.state_names]
    canonical = to_graph_state(from_graph_state(graph))
    return {n: t.numpy() for n, t in zip(runtime.state_names, canonical, strict=True)}


def test_full_graph_matches_torch(model: InterestEncoder, runtime: EncoderRuntime) -> None:
    """full.onnx == InterestEncoder.state_from_window, with and without a persisted memory."""
    T = runtime.receptive_field + 4  # longer than the export example: the window is dynamic
    items, types, gaps = _history(4, T, model.cfg.n_items, seed=3)
    items = _left_pad(items, [T, T - 2, 3, 0])  # padding, a short user, an empty user
    memory = np.random.default_rng(4).normal(size=(4, model.cfg.d_model)).astype(np.float32)
    session = runtime._full
    for has in (np.ones(4, bool), np.zeros(4, bool)):
        got = session.run(
            None,
            {"items": items, "types": types, "gaps": gaps, "memory_in": memory, "has_memory": has},
        )
        with torch.no_grad():
            ref_vec, ref_state = model.state_from_window(
                _t(items), _t(types), _t(gaps), _t(memory) if has.all() else None
            )
        assert _maxdiff(ref_vec[:3], got[0][:3]) <= TOL  # row 3 has no event: vector undefined
        names = state_names(model.cfg.n_layers)
        assert runtime.state_names == names
        for name, ref, out in zip(names, to_graph_state(ref_state), got[1:], strict=True):
            assert out.dtype == ref.numpy().dtype, name
            assert _maxdiff(ref, out) <= TOL, name


def test_full_graph_matches_forward(model: InterestEncoder, runtime: EncoderRuntime) -> None:
    """rebuild() of a whole history == the model's forward() at the last event."""
    items, types, gaps = _history(3, 12, model.cfg.n_items, seed=5)
    with torch.no_grad():
        ref = model(_t(items), _t(types), _t(gaps))[:, -1]
    vectors, _ = runtime.rebuild(items, types, gaps)
    assert _maxdiff(ref, vectors) <= TOL


def test_step_graph_matches_torch(model: InterestEncoder, runtime: EncoderRuntime) -> None:
    items, types, gaps = _history(3, 8, model.cfg.n_items, seed=6)
    with torch.no_grad():
        _, state = model.state_from_window(_t(items), _t(types), _t(gaps))
        nxt = (np.array([5, 0, 7]), np.array([1, 2, 3]), np.array([4, 5, 6]))  # row 1: no event
        ref_vec, ref_state = model.step(state, *(_t(a) for a in nxt))
    arrays = [t.numpy() for t in to_graph_state(state)]
    ort_state = EncoderStates(
        arrays=dict(zip(runtime.state_names, arrays, strict=True)),
        vectors=np.zeros((3, model.cfg.d_model), np.float32),
    )
    before = {n: a.copy() for n, a in ort_state.arrays.items()}
    vec, out = runtime.step(ort_state, *nxt)
    assert _maxdiff(ref_vec[[0, 2]], vec[[0, 2]]) <= TOL
    assert not vec[1].any()  # skipped user: previous (zero) vector
    got = _oldest_first(runtime, out)
    for name, ref in zip(runtime.state_names, to_graph_state(ref_state), strict=True):
        assert _maxdiff(ref[[0, 2]], got[name][[0, 2]]) <= TOL, name
        assert _maxdiff(ref[1], out.arrays[name][1]) == 0, name  # skipped: unchanged
        assert np.array_equal(ort_state.arrays[name], before[name]), name  # step() copies


def test_step_in_place_matches_reference(model: InterestEncoder, runtime: EncoderRuntime) -> None:
    """The in-place ring update (the worker's path) == step.onnx's outputs applied by
    export/graphs.py's plain ``next_state``, for a subset of rows and across the ring's end."""
    items, types, gaps = _history(4, runtime.receptive_field + 5, model.cfg.n_items, seed=12)
    _, states = runtime.rebuild(items, types, gaps)
    slots = model.cfg.span - 1
    states.arrays["ring"][:] = [0, slots - 1, 2, 1]  # the first, the last, middle ones
    rows = np.array([3, 0, 2])
    event = (np.array([4, 9, 2]), np.array([1, 0, 2]), np.array([3, 1, 7]))
    graph_state = [torch.from_numpy(states.arrays[n][rows].copy()) for n in runtime.state_names]
    feeds = dict(
        zip(runtime._step_inputs, [*event, *(t.numpy() for t in graph_state)], strict=True)
    )
    ref_vec, *outputs = runtime._step.run(None, feeds)
    ref = next_state(graph_state, [torch.from_numpy(o) for o in outputs])
    untouched = {n: a[1].copy() for n, a in states.arrays.items()}
    vec = runtime.step_in_place(states, *event, rows=rows)
    assert np.array_equal(vec, ref_vec)
    assert np.array_equal(states.vectors[rows], ref_vec)
    for name, want in zip(runtime.state_names, ref, strict=True):
        assert np.array_equal(states.arrays[name][rows], want.numpy()), name
        assert np.array_equal(states.arrays[name][1], untouched[name]), name  # row 1: no event


def test_step_rows_in_place_matches_step_onnx(runtime: EncoderRuntime) -> None:
    """The worker's path (the step's stages with the attention read in place in the slab) ==
    step.onnx (``step_in_place``, the reference), step after step across the ring's end, for
    users with full and part-filled caches; rows without an event stay as they were."""
    n_items, slots = runtime.n_items, runtime.receptive_field  # more than enough history
    lengths = [slots, 0, 1, 3, slots, 2]  # 0 and 1: empty cache slots left
    items, types, gaps = _history(len(lengths), slots, n_items, seed=21)
    _, slab = runtime.rebuild(
        [i[len(i) - n :] for i, n in zip(items, lengths, strict=True)],
        [t[len(t) - n :] for t, n in zip(types, lengths, strict=True)],
        [g[len(g) - n :] for g, n in zip(gaps, lengths, strict=True)],
    )
    slab.arrays["ring"][:] = [0, 1, 2, 3, 1, 0]
    reference = slab.take(np.arange(len(slab)))
    rows = np.array([4, 0, 2, 1])
    untouched = {n: a[[3, 5]].copy() for n, a in slab.arrays.items()}
    rng = np.random.default_rng(3)
    for _ in range(6):  # more steps than cache slots: every ring wraps
        event = (rng.integers(1, n_items + 1, 4), rng.integers(0, 4, 4), rng.integers(0, 8, 4))
        want = runtime.step_in_place(reference, *event, rows=rows)
        got = runtime.step_rows(slab, rows, *event)
        assert _maxdiff(want, got) <= TOL
    assert _maxdiff(reference.vectors, slab.vectors) <= TOL
    for name, a in slab.arrays.items():
        assert _maxdiff(reference.arrays[name], a) <= TOL, name
        assert np.array_equal(a[[3, 5]], untouched[name]), name


def test_step_rows_refuses_repeated_rows_and_unknown_items(runtime: EncoderRuntime) -> None:
    slab = runtime.initial_state(3)
    before = {n: a.copy() for n, a in slab.arrays.items()}
    one = np.ones(2, np.int64)
    with pytest.raises(ValueError, match="at most once"):
        runtime.step_rows(slab, [1, 1], one, one, one)
    with pytest.raises(ValueError, match="known items"):
        runtime.step_rows(slab, [0, 1], np.array([1, -1]), one, one)
    for name, a in slab.arrays.items():
        assert np.array_equal(a, before[name]), name


def test_incremental_steps_equal_full_recompute(
    model: InterestEncoder, runtime: EncoderRuntime
) -> None:
    """A chain of ONNX steps over a history 3x the receptive field == torch full forward at
    every event, and a rebuild from the last receptive_field events + memory continues it."""
    T = 3 * runtime.receptive_field + 2
    lengths = [T, 17, 4]
    items, types, gaps = _history(3, T, model.cfg.n_items, seed=7)
    items = _left_pad(items, lengths)
    with torch.no_grad():
        full = model(_t(items), _t(types), _t(gaps)).numpy()  # (B,T,d)
    states = runtime.initial_state(3)
    worst = 0.0
    for t in range(T):
        vec, states = runtime.step(states, items[:, t], types[:, t], gaps[:, t])
        for b, n in enumerate(lengths):
            if t >= T - n:
                worst = max(worst, _maxdiff(full[b, t], vec[b]))
    assert worst <= TOL
    graph_state = [torch.from_numpy(states.arrays[n]) for n in runtime.state_names]
    filled = from_graph_state(graph_state).count.tolist()  # the state knows up to span-1
    assert filled == [min(n, model.cfg.span - 1) for n in lengths]

    # Rebuild from the window tail + persisted memory, as the worker does on a cache miss.
    rows = [slice(T - n, T) for n in lengths]
    rf = runtime.receptive_field
    vec_r, rebuilt = runtime.rebuild(
        [items[b, r][-rf:] for b, r in enumerate(rows)],
        [types[b, r][-rf:] for b, r in enumerate(rows)],
        [gaps[b, r][-rf:] for b, r in enumerate(rows)],
        memory=states.memory,
    )
    assert _maxdiff(vec, vec_r) <= TOL
    more_items, more_types, more_gaps = _history(3, 6, model.cfg.n_items, seed=8)
    for t in range(6):
        step = (more_items[:, t], more_types[:, t], more_gaps[:, t])
        v1, states = runtime.step(states, *step)
        v2, rebuilt = runtime.step(rebuilt, *step)
        assert _maxdiff(v1, v2) <= TOL


def test_scores_match_torch(model: InterestEncoder, runtime: EncoderRuntime) -> None:
    vectors = np.random.default_rng(9).normal(size=(2, model.cfg.d_model)).astype(np.float32)
    with torch.no_grad():
        ref = model.item_scores(_t(vectors)).numpy()
    got = runtime.scores(vectors)
    assert _maxdiff(ref[:, 1:], got[:, 1:]) <= TOL


def test_model_without_memory_exports_and_steps(tmp_path: Path) -> None:
    """use_memory=False (the ablation) exports too; step chain == forward."""
    from export.bundle import export_bundle, save_model_dir

    from .conftest import ITEM_IDS, tiny_model

    model = tiny_model(use_memory=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = export_bundle(save_model_dir(model, ITEM_IDS, tmp_path / "m"), tmp_path / "b")
    rt = EncoderRuntime.load(bundle)
    items, types, gaps = _history(2, 2 * rt.receptive_field, model.cfg.n_items, seed=11)
    with torch.no_grad():
        full = model(_t(items), _t(types), _t(gaps)).numpy()
    states = rt.initial_state(2)
    for t in range(items.shape[1]):
        vec, states = rt.step(states, items[:, t], types[:, t], gaps[:, t])
        assert _maxdiff(full[:, t], vec) <= TOL
