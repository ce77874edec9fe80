"""How the runtime opens ONNX Runtime sessions: which execution providers, which options, and
which form of the step runs on the provider it got."""

from __future__ import annotations

import ctypes
import os

import onnxruntime as ort

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
# "staged": step.onnx's stages around the in-place attention on the host slab (numba);
# "graph": step.onnx whole on the rows gathered from the slab; "auto": by provider.
STEP_MODES = ("auto", "staged", "graph")


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
        return [CPU_PROVIDER]
    cuda_listed = CUDA_PROVIDER in ort.get_available_providers()
    if device == "cuda" or (cuda_listed and _cuda_device_count() > 0):
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


def check_step_mode(step_mode: str) -> str:
    """``step_mode`` itself, or a one-line ValueError before any graph is loaded."""
    if step_mode not in STEP_MODES:
        raise ValueError(f"step_mode must be auto, staged or graph, not {step_mode!r}")
    return step_mode


def choose_step_mode(step_mode: str, provider: str) -> str:
    """The step's form, "staged" or "graph", for the provider the sessions actually run on
    (not the one asked for: ORT falls back to CPU silently).

    Why "graph" off the CPU: the staged step's attention is a host kernel between stage
    graphs, so on a device every layer would copy activations out and back and wait for them;
    the whole graph keeps the layers on the device. On the CPU the staged step reads the slab
    where it lies and copies nothing.
    """
    if check_step_mode(step_mode) != "auto":
        return step_mode
    return "staged" if provider == CPU_PROVIDER else "graph"


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, a container's cpuset), which
    os.cpu_count() ignores; more threads than that only take turns on the same cores."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        return os.cpu_count() or 1


def session_options(intra_op_threads: int | None = None, spin: bool = False) -> ort.SessionOptions:
    """Full graph optimisation and a small intra-op pool.

    Why these: the worker runs inference in a thread beside its event loop, which needs a
    core for Kafka I/O; a bounded pool that does not spin between runs (spinning would burn
    that core while the loop waits on the broker) leaves it free. ``spin=True`` shortens a
    small step when cores are free, and slows every call when they are shared with other
    processes, so it is off unless asked for.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = intra_op_threads or max(1, min(4, usable_cores()))
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 3
    return so
