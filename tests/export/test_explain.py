"""Leave-one-out explanations: the runtime's (export/explain.py, no torch) against the torch
reference (encoder/explain.py) and against brute force over the whole history."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from encoder import explain as reference
from encoder.model import InterestEncoder
from export import explain
from export.runtime import UNKNOWN, EncoderRuntime

from .conftest import ITEM_IDS, tiny_model

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5  # scores and weights, runtime vs torch and vs brute force (float32 graphs)


@pytest.fixture(scope="module")
def models(
    model: InterestEncoder, runtime: EncoderRuntime, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[InterestEncoder, EncoderRuntime]]:
    """The session's model plus two more random ones, one without memory, and their bundles."""
    from export.bundle import export_bundle, save_model_dir

    out = {"memory": (model, runtime)}
    for name, use_memory, seed in (("no-memory", False, 1), ("memory-2", True, 2)):
        other = tiny_model(use_memory=use_memory, seed=seed)
        path = tmp_path_factory.mktemp(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bundle = export_bundle(save_model_dir(other, ITEM_IDS, path / "m"), path / "b")
        out[name] = (other, EncoderRuntime.load(bundle, intra_op_threads=1))
    return out


def _window(length: int, seed: int, unknown: float = 0.2) -> tuple[np.ndarray, ...]:
    """items (UNKNOWN for about ``unknown`` of them), types, timestamps (ms) whose gaps span
    every bucket of the tiny model, equal timestamps included."""
    rng = np.random.default_rng(seed)
    items = rng.integers(1, len(ITEM_IDS) + 1, length)
    items[rng.random(length) < unknown] = UNKNOWN
    types = rng.integers(0, 4, length)
    seconds = 10 ** rng.uniform(-1, 2.5, length)
    seconds[rng.random(length) < 0.1] = 0
    timestamps = 1_700_000_000_000 + np.cumsum((seconds * 1000).astype(np.int64))
    return items, types, timestamps


def _targets(seed: int, k: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.arange(1, len(ITEM_IDS) + 1), k, replace=False)


def _stepped_memory(
    rt: EncoderRuntime, items: np.ndarray, types: np.ndarray, ts: np.ndarray
) -> np.ndarray:
    """The memory the worker persists after the history: one step per event (unknown skipped)."""
    gaps = explain.window_gaps(ts, rt.n_time_buckets)
    states = rt.initial_state(1)
    for t in range(len(items)):
        _, states = rt.step(states, items[t : t + 1], types[t : t + 1], gaps[t : t + 1])
    return states.memory[0].copy()


def _brute_force(
    rt: EncoderRuntime,
    items: np.ndarray,
    types: np.ndarray,
    ts: np.ndarray,
    targets: np.ndarray,
    start: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores after the whole history and, for each event j >= ``start``, the drop when the
    history is rebuilt from scratch without j (memory recomputed from every event)."""

    def scores(keep: np.ndarray) -> np.ndarray:
        gaps = explain.window_gaps(ts[keep], rt.n_time_buckets)
        vectors, _ = rt.rebuild([items[keep]], [types[keep]], [gaps])
        return rt.scores(vectors)[0, targets].astype(np.float64)

    everything = np.arange(len(items))
    full = scores(everything)
    weights = np.zeros((len(targets), len(items) - start))
    for j in range(start, len(items)):
        if items[j] > 0:
            weights[:, j - start] = full - scores(everything[everything != j])
    return full, weights


@pytest.mark.parametrize("name", ["memory", "no-memory", "memory-2"])
@pytest.mark.parametrize("length", [0, 1, 5, 9, 15, 30])
@pytest.mark.parametrize("with_memory", [True, False])
def test_runtime_matches_torch_reference(
    models: dict[str, tuple[InterestEncoder, EncoderRuntime]],
    name: str,
    length: int,
    with_memory: bool,
) -> None:
    """Windows shorter and longer than the receptive field (9), unknown items, a persisted
    memory or none; the exported graph in one batch == the torch model one variant at a time."""
    model, rt = models[name]
    assert rt.receptive_field == 9
    seed = 100 * length + with_memory
    items, types, ts = _window(length, seed)
    memory = None
    if with_memory:
        memory = np.random.default_rng(seed).normal(0, 0.05, model.cfg.d_model).astype(np.float32)
    targets = _targets(seed)
    use_gaps = length != 15  # one window length as a model trained without timestamps
    got_scores, got = explain.leave_one_out(rt, items, types, ts, memory, targets, use_gaps)
    ref_scores, ref = reference.leave_one_out(model, items, types, ts, memory, targets, use_gaps)
    assert got.shape == (len(targets), length) and got.dtype == np.float32
    assert got_scores.shape == (len(targets),) and got_scores.dtype == np.float32
    assert np.abs(got_scores - ref_scores).max() <= TOL
    if length:
        assert np.abs(got - ref).max() <= TOL
        assert (got[:, items <= 0] == 0).all()  # not in the model's input
    if length > 1:
        assert np.abs(ref).max() > 100 * TOL  # the weights compared are not all ~0


@pytest.mark.parametrize("name", ["memory", "no-memory"])
def test_weights_equal_brute_force_over_the_whole_history(
    models: dict[str, tuple[InterestEncoder, EncoderRuntime]], name: str
) -> None:
    """The window is the whole history: each weight is exactly the score drop of rebuilding the
    history without that event from scratch (memory recomputed from every event), whether the
    memory comes recomputed (None) or persisted by stepping the history."""
    _, rt = models[name]
    items, types, ts = _window(14, seed=7)
    targets = _targets(7)
    want_scores, want = _brute_force(rt, items, types, ts, targets, start=0)
    for memory in (None, _stepped_memory(rt, items, types, ts)):
        scores, weights = explain.leave_one_out(rt, items, types, ts, memory, targets)
        assert np.abs(scores - want_scores).max() <= TOL
        assert np.abs(weights - want).max() <= TOL
    for k in range(len(targets)):  # removing the top event lowers the score by its weight
        j, weight = explain.top_events(weights[k], 1)[0]
        assert weight > 0 and weight == pytest.approx(want[k, j], abs=TOL)


def test_window_of_a_longer_history_includes_the_memory_path(
    models: dict[str, tuple[InterestEncoder, EncoderRuntime]],
) -> None:
    """A window (>= receptive_field + 2 known events) of a longer history with the memory the
    worker persisted: each weight == brute force over the whole history. Events older than the
    attention's reach move the score through the memory alone: their weights are not 0."""
    _, rt = models["memory"]
    items, types, ts = _window(45, seed=11)
    start = 20  # the window: the last 25 events
    window = slice(start, None)
    known = items[window] > 0
    assert known.sum() >= rt.receptive_field + 2
    memory = _stepped_memory(rt, items, types, ts)
    targets = _targets(11)
    scores, weights = explain.leave_one_out(
        rt, items[window], types[window], ts[window], memory, targets
    )
    want_scores, want = _brute_force(rt, items, types, ts, targets, start)
    assert np.abs(scores - want_scores).max() <= TOL
    assert np.abs(weights - want).max() <= TOL
    # events whose removal leaves the last receptive_field events and their gaps as they were
    positions = np.flatnonzero(known)
    memory_only = positions[: -(rt.receptive_field + 1)]
    assert len(memory_only) >= 2
    assert (np.abs(weights[:, memory_only]).max(axis=0) > 100 * TOL).all()


def test_top_events_biggest_positive_first() -> None:
    w = np.array([0.1, -0.5, 0.0, 0.3, 0.1, 0.2], np.float32)
    assert [j for j, _ in explain.top_events(w, 3)] == [3, 5, 0]
    assert [j for j, _ in explain.top_events(w, 10)] == [3, 5, 0, 4]  # ties: older first
    assert explain.top_events(w, 1)[0][1] == pytest.approx(0.3)
    assert explain.top_events(-np.abs(w), 3) == []
    assert explain.top_events(np.zeros(0), 3) == []


def test_bad_arguments_are_refused(runtime: EncoderRuntime) -> None:
    items, types, ts = _window(5, seed=3)
    for targets in ([0], [runtime.n_items + 1], [UNKNOWN]):
        with pytest.raises(ValueError, match="targets"):
            explain.leave_one_out(runtime, items, types, ts, None, np.array(targets))
    with pytest.raises(ValueError, match="one entry per event"):
        explain.leave_one_out(runtime, items, types[:-1], ts, None, np.array([1]))


def test_window_of_unknown_items_only_weighs_nothing(runtime: EncoderRuntime) -> None:
    items, types, ts = _window(4, seed=5, unknown=1.0)
    scores, weights = explain.leave_one_out(runtime, items, types, ts, None, np.array([1, 2]))
    assert (scores == 0).all() and (weights == 0).all()  # no vector yet (popularity's case)


def test_explain_does_not_import_torch(bundle: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from export.explain import leave_one_out, top_events
        from export.runtime import EncoderRuntime
        rt = EncoderRuntime.load({str(bundle)!r})
        items = rt.index_of(["item-1", "nope", "item-2", "item-3"])
        ts = np.array([0, 1000, 5000, 9000])
        scores, w = leave_one_out(rt, items, np.zeros(4, int), ts, np.ones(rt.d_model), [4, 5])
        top_events(w[0], 2)
        assert "torch" not in sys.modules, "explain imported torch"
        print(w.shape)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 4)"


@torch.no_grad()
def test_reference_memory_is_the_model_memory_without_the_event(model: InterestEncoder) -> None:
    """The decomposition both sides use: from the memory after a whole history and its last
    events alone, the memory the model's own recurrence gives for the history without one of
    those events (older events decaying one step less)."""
    rng = np.random.default_rng(9)
    items = torch.as_tensor(rng.integers(1, model.cfg.n_items + 1, (1, 16)))
    items[0, [2, 7, 12]] = 0  # padding: the memory neither decays nor adds there

    def memory(items: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros_like(items)
        return model.forward_with_cache(items, zeros, zeros).memory[:, -1]

    whole = memory(items)
    window = items[0, 6:].tolist()  # what the explanation sees: the last 10 events
    for j in (0, 3, 9):
        without = memory(torch.cat([items[:, : 6 + j], items[:, 7 + j :]], dim=1))
        assert torch.allclose(reference._without(model, whole, window, j), without, atol=1e-6)


def test_one_known_event_with_its_own_memory_is_the_user_without_events(
    models: dict[str, tuple[InterestEncoder, EncoderRuntime]],
) -> None:
    """The worker's memory after a user's first event is that event's share alone: without it
    nothing is left, in the runtime and in the torch reference alike (a vector of zeros)."""
    model, rt = models["memory"]
    items = np.array([5, UNKNOWN])
    memory = rt.item_embeddings[5].astype(np.float32)  # gamma^0 e(item 5), from zero
    targets = np.array([1, 2, 3])
    args = (items, np.zeros(2, np.int64), np.array([1_000, 61_000]), memory, targets)
    scores, weights = explain.leave_one_out(rt, *args)
    ref_scores, ref_weights = reference.leave_one_out(model, *args)
    np.testing.assert_allclose(scores, ref_scores, atol=TOL)
    np.testing.assert_allclose(weights, ref_weights, atol=TOL)
    np.testing.assert_allclose(weights[:, 0], scores, atol=TOL)  # the whole score is its
