"""Which step runs on which device: the whole-graph step (a GPU's) against the staged step (the
CPU's), the choice by provider, and the CUDA request on a machine without one. CPU only: the
CUDA provider itself runs in bench/gpu.sh."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from export import sessions
from export.bundle_format import SLOT_AXIS
from export.runtime import EncoderRuntime, EncoderStates

ATOL = 1e-5
SLAB = 24  # rows of the slab; each call steps a few of them
EVERY_BATCH = np.array([3, 17])  # users with an event in every call: their rings wrap


@pytest.fixture(scope="module")
def graph_runtime(bundle: Path) -> EncoderRuntime:
    return EncoderRuntime.load(bundle, device="cpu", intra_op_threads=1, step_mode="graph")


@pytest.fixture(scope="module")
def staged_runtime(bundle: Path) -> EncoderRuntime:
    return EncoderRuntime.load(bundle, device="cpu", intra_op_threads=1, step_mode="staged")


def _slab(runtime: EncoderRuntime, seed: int) -> EncoderStates:
    """A slab of users with 0 to receptive_field + 2 events (part-filled and full caches), each
    at its own ring position."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, runtime.receptive_field + 3, SLAB)
    items = [rng.integers(1, runtime.n_items + 1, n) for n in lengths]
    types = [rng.integers(0, len(runtime.event_types), n) for n in lengths]
    gaps = [rng.integers(0, runtime.n_time_buckets, n) for n in lengths]
    _, slab = runtime.rebuild(items, types, gaps)
    slots = slab.arrays["keys_0"].shape[SLOT_AXIS]
    slab.arrays["ring"][:] = rng.integers(0, slots, SLAB)
    return slab


def _maxdiff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))


def test_graph_step_rows_equals_staged(
    graph_runtime: EncoderRuntime, staged_runtime: EncoderRuntime
) -> None:
    """Batch after batch on rows scattered over a bigger slab, some users in every batch (so the
    ring wraps), others now and then: same vectors and same slab, rows without an event
    untouched."""
    assert (graph_runtime.step_mode, staged_runtime.step_mode) == ("graph", "staged")
    graph_slab = _slab(staged_runtime, seed=5)
    staged_slab = graph_slab.take(np.arange(SLAB))
    before = graph_slab.take(np.arange(SLAB))
    rng = np.random.default_rng(11)
    others = np.setdiff1d(np.arange(SLAB), EVERY_BATCH)
    stepped: set[int] = set()
    for _ in range(staged_runtime.receptive_field // 2 + 4):
        rows = np.concatenate([EVERY_BATCH, rng.choice(others, 5, replace=False)])
        rng.shuffle(rows)
        stepped.update(rows.tolist())
        n = len(rows)
        event = (
            rng.integers(1, staged_runtime.n_items + 1, n),
            rng.integers(0, len(staged_runtime.event_types), n),
            rng.integers(0, staged_runtime.n_time_buckets, n),
        )
        want = staged_runtime.step_rows(staged_slab, rows, *event)
        got = graph_runtime.step_rows(graph_slab, rows, *event)
        assert _maxdiff(want, got) <= ATOL
    assert _maxdiff(staged_slab.vectors, graph_slab.vectors) <= ATOL
    idle = [r for r in range(SLAB) if r not in stepped]
    for name, a in graph_slab.arrays.items():
        assert _maxdiff(staged_slab.arrays[name], a) <= ATOL, name
        assert np.array_equal(a[idle], before.arrays[name][idle]), name


def test_graph_step_rows_refuses_what_staged_refuses(graph_runtime: EncoderRuntime) -> None:
    slab = graph_runtime.initial_state(3)
    one = np.ones(2, np.int64)
    with pytest.raises(ValueError, match="at most once"):
        graph_runtime.step_rows(slab, [1, 1], one, one, one)
    with pytest.raises(ValueError, match="known items"):
        graph_runtime.step_rows(slab, [0, 1], np.array([1, -1]), one, one)


def test_auto_follows_the_provider_got(runtime: EncoderRuntime) -> None:
    cpu, cuda = sessions.CPU_PROVIDER, sessions.CUDA_PROVIDER
    assert sessions.choose_step_mode("auto", cpu) == "staged"
    assert sessions.choose_step_mode("auto", cuda) == "graph"
    assert sessions.choose_step_mode("staged", cuda) == "staged"
    assert sessions.choose_step_mode("graph", cpu) == "graph"
    if runtime.provider == cpu:  # the fixture loads with device="auto"
        assert runtime.step_mode == "staged"


def test_cuda_asked_for_reports_what_it_got(bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    """CUDA first, CPU as the fallback; the runtime says which one runs, and its step follows
    that one, not the one asked for."""
    assert sessions.choose_providers("cuda") == [sessions.CUDA_PROVIDER, sessions.CPU_PROVIDER]
    with caplog.at_level(logging.INFO, logger="export.runtime"):
        rt = EncoderRuntime.load(bundle, device="cuda", intra_op_threads=1)
    if sessions._cuda_device_count() > 0 and rt.provider == sessions.CUDA_PROVIDER:
        assert rt.step_mode == "graph"
        return
    assert rt.provider == sessions.CPU_PROVIDER
    assert rt.step_mode == "staged"
    assert "asked for CUDAExecutionProvider, running on CPUExecutionProvider" in caplog.text
    assert "step staged" in caplog.text


def test_a_bad_step_mode_is_one_line(bundle: Path) -> None:
    with pytest.raises(ValueError, match="step_mode must be auto, staged or graph") as err:
        EncoderRuntime.load(bundle, device="cpu", step_mode="gpu")
    assert "\n" not in str(err.value)
    assert "'gpu'" in str(err.value)


def test_inference_threads_follow_the_cores_the_process_may_use() -> None:
    """A worker pinned to one core (taskset, a container's cpuset) runs one intra-op thread
    there, not one per core of the machine."""
    import os
    import subprocess
    import sys

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    probe = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from export.sessions import session_options; "
        "print(session_options().intra_op_num_threads)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
