"""The runtime on a GPU: proves the CUDA provider is the one that runs, checks it against the CPU
provider, and times the worker's inference on both at batch 1, 256 and 2000, side by side.

    python bench/gpu.py [BUNDLE] [--device cuda|cpu] [--batches 1 256 2000] [--reps 10]
                        [--n-items 3416] [--threads N] [--out results.json]

BUNDLE: an exported bundle; without one, a randomly initialised model of the encoder's default
shape is exported to a temporary bundle (needs torch; weights do not change the cost).
bench/gpu.sh installs what this needs and runs it.

Three runtimes on one bundle: the device's with the step it chooses there ("graph" on CUDA:
step.onnx whole), the device's with the staged step forced (the CPU's form: stage graphs around
a host attention kernel, so the choice is measured, not assumed), and the CPU's (as the worker
runs without a GPU). Parity (rebuild, step_rows, top_k on the same random inputs, device vs
CPU) must hold to PARITY_TOL before anything is timed. Times are medians of ``--reps`` calls
after warm-up, the runtimes taking turns call by call.

``--device cpu`` runs the same logic with the CPU provider as "the device" and the graph step
forced: a check of this script on a machine without a GPU, not a measurement of a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export import sessions
from export.bundle_format import SLOT_AXIS
from export.runtime import EncoderRuntime, EncoderStates

PARITY_TOL = 1e-3
PARITY_USERS = 64
TOP_K = 10
SEEN = 50  # excluded items per user in top_k
WARMUP = 3
CASE_SECONDS = 20.0  # a case stops taking reps after this long (it keeps at least three)
BASE_USERS = 256  # users rebuilt for the timing slab; the slab repeats them
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def export_random_bundle(out: Path, n_items: int) -> Path:
    """A bundle of a randomly initialised encoder of the default shape (what
    bench/incremental.py times), exported by the project's own exporter."""
    import torch

    from encoder.model import EncoderConfig, InterestEncoder
    from export.bundle import export_bundle, save_model_dir

    torch.manual_seed(0)
    model = InterestEncoder(EncoderConfig(n_items=n_items)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_dir = save_model_dir(model, [str(i) for i in range(1, n_items + 1)], out / "m")
        return export_bundle(model_dir=model_dir, out=out / "bundle")


# ---------------------------------------------------------------------- the CUDA provider


def load_cuda_libraries() -> None:
    """Make the CUDA and cuDNN libraries of pip's nvidia-* wheels visible to ORT, the two ways
    ORT documents: a CUDA build of torch loads them on import, ``preload_dlls`` finds them
    beside onnxruntime. Where the system provides them, neither is needed and both are no-ops."""
    import onnxruntime as ort

    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    if hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception):
            ort.preload_dlls()


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
    """Lines ORT writes to fds 1 and 2 (its C++ logger bypasses sys.stderr) inside the block."""
    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            lines.extend(line.strip() for line in sink if line.strip())


def cuda_failure_reason() -> str:
    """Why ORT did not give the CUDA provider, in ORT's own words where it says any."""
    import onnxruntime as ort

    from export.scoring import scoring_graph

    listed = ort.get_available_providers()
    if sessions.CUDA_PROVIDER not in listed:
        return (
            f"onnxruntime {ort.__version__} lists only {listed}: the CPU package 'onnxruntime' "
            "is installed instead of (or over) 'onnxruntime-gpu'"
        )
    if sessions._cuda_device_count() == 0:
        return "libcuda.so.1 sees no CUDA device (no NVIDIA driver loaded, or no GPU visible)"
    so = ort.SessionOptions()
    so.log_severity_level = 1  # warnings and errors: where ORT says which library is missing
    with captured_output() as lines:
        try:
            probe = ort.InferenceSession(
                scoring_graph(np.zeros((2, 4), np.float32)), so, providers=[sessions.CUDA_PROVIDER]
            )
            got = probe.get_providers()
        except Exception as exc:  # onnxruntime raises its own exception types
            got = [f"an error: {exc}"]
    said: list[str] = []
    for line in lines:  # ORT's log lines: colour, timestamp and source first, then the message
        message = ANSI.sub("", line).split("] ", 1)[-1].split(" : FAIL : ", 1)[-1].strip()
        if any(w in message.lower() for w in ("error", "fail", "cannot")) and message not in said:
            said.append(message)
    return "; ".join(said[:3]) or f"ORT {ort.__version__} gave {got} and said nothing more"


def load_runtimes(bundle: Path, device: str, threads: int | None) -> dict[str, EncoderRuntime]:
    """ "device" (the step its provider chooses; graph forced on --device cpu), "device staged"
    and "cpu". Exits with ORT's reason when --device cuda does not get CUDA."""
    if device == "cuda":
        load_cuda_libraries()
    mode = "auto" if device == "cuda" else "graph"
    rt = EncoderRuntime.load(bundle, device=device, intra_op_threads=threads, step_mode=mode)
    want = sessions.CUDA_PROVIDER if device == "cuda" else sessions.CPU_PROVIDER
    if rt.provider != want:
        sys.exit(f"error: the CUDA provider did not load: {cuda_failure_reason()}")
    if rt.step_mode != "graph":
        sys.exit(f"error: step_mode auto chose {rt.step_mode!r} on {rt.provider}, not 'graph'")
    staged = EncoderRuntime.load(
        bundle, device=device, intra_op_threads=threads, step_mode="staged"
    )
    cpu = EncoderRuntime.load(bundle, device="cpu", intra_op_threads=threads)
    return {"device": rt, "device staged": staged, "cpu": cpu}


# ---------------------------------------------------------------------- inputs


def histories(
    rt: EncoderRuntime, batch: int, length: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(items, types, gaps) of ``batch`` users with ``length`` events each, and a memory."""
    items = rng.integers(1, rt.n_items + 1, (batch, length))
    types = rng.integers(0, len(rt.event_types), (batch, length))
    gaps = rng.integers(0, rt.n_time_buckets, (batch, length))
    memory = rng.normal(size=(batch, rt.d_model)).astype(np.float32)
    return items, types, gaps, memory


def events(rt: EncoderRuntime, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    return (
        rng.integers(1, rt.n_items + 1, batch),
        rng.integers(0, len(rt.event_types), batch),
        rng.integers(0, rt.n_time_buckets, batch),
    )


def top_k_inputs(
    rt: EncoderRuntime, batch: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    vectors = rng.normal(size=(batch, rt.d_model)).astype(np.float32)
    return vectors, rng.integers(1, rt.n_items + 1, (batch, SEEN))


def slab_of(rt: EncoderRuntime, users: int, rng: np.random.Generator) -> EncoderStates:
    """A slab of ``users`` full states (caches filled, memory set), each at its own ring
    position: BASE_USERS rebuilt from random histories, repeated."""
    base_users = min(users, BASE_USERS)
    _, base = rt.rebuild(*histories(rt, base_users, rt.receptive_field, rng))
    slab = EncoderStates.stack([base] * -(-users // base_users)).take(np.arange(users))
    slots = slab.arrays["keys_0"].shape[SLOT_AXIS]
    slab.arrays["ring"][:] = rng.integers(0, slots, users)
    return slab


# ---------------------------------------------------------------------- parity


def maxdiff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))


def parity(dev: EncoderRuntime, cpu: EncoderRuntime, seed: int = 0) -> dict[str, float]:
    """Max abs difference, device vs CPU, of rebuild (vectors and every state array),
    step_rows over a few calls on rows of a bigger slab (vectors and the slab), top_k scores;
    and the share of top_k indices that agree (near-ties may swap)."""
    rng = np.random.default_rng(seed)
    users = PARITY_USERS
    window = histories(cpu, users, cpu.receptive_field + 10, rng)
    dev_vec, dev_states = dev.rebuild(*window)
    cpu_vec, cpu_states = cpu.rebuild(*window)
    rebuild = max(
        maxdiff(dev_vec, cpu_vec),
        *(maxdiff(dev_states.arrays[n], a) for n, a in cpu_states.arrays.items()),
    )
    cpu_slab = slab_of(cpu, 2 * users, rng)
    dev_slab = cpu_slab.take(np.arange(len(cpu_slab)))
    step = 0.0
    for _ in range(4):
        rows = rng.choice(len(cpu_slab), users, replace=False)
        event = events(cpu, users, rng)
        got = dev.step_rows(dev_slab, rows, *event)
        step = max(step, maxdiff(got, cpu.step_rows(cpu_slab, rows, *event)))
    step = max(
        step,
        maxdiff(dev_slab.vectors, cpu_slab.vectors),
        *(maxdiff(dev_slab.arrays[n], a) for n, a in cpu_slab.arrays.items()),
    )
    vectors, seen = top_k_inputs(cpu, users, rng)
    dev_idx, dev_scores = dev.top_k(vectors, TOP_K, exclude=seen)
    cpu_idx, cpu_scores = cpu.top_k(vectors, TOP_K, exclude=seen)
    return {
        "rebuild": rebuild,
        "step_rows": step,
        "top_k": maxdiff(dev_scores, cpu_scores),
        "top_k_same_indices": float(np.mean(dev_idx == cpu_idx)),
    }


# ---------------------------------------------------------------------- timing


def medians_ms(calls: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median ms per call of each function after WARMUP untimed calls, the functions taking
    turns call by call so a slow spell lands on all of them; a case that runs past
    CASE_SECONDS stops after three reps."""
    for fn in calls.values():
        for _ in range(WARMUP):
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    started = time.perf_counter()
    for rep in range(reps):
        if rep >= 3 and time.perf_counter() - started > CASE_SECONDS:
            break
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def cases(
    runtimes: dict[str, EncoderRuntime], batch: int, rng: np.random.Generator
) -> dict[str, dict[str, Callable[[], object]]]:
    """The calls to time at one batch size, per op and runtime. step_rows steps distinct rows
    of a slab twice the batch (the worker's slab holds more users than a batch); rebuild takes
    one receptive field of events and a memory; top_k excludes SEEN items per user. The
    staged runtime times step_rows only: its full and scoring sessions are the device's."""
    cpu = runtimes["cpu"]
    slab = slab_of(cpu, 2 * batch, rng)
    rows = rng.choice(len(slab), batch, replace=False)
    event = events(cpu, batch, rng)
    window = histories(cpu, batch, cpu.receptive_field, rng)
    vectors, seen = top_k_inputs(cpu, batch, rng)
    whole = {k: rt for k, rt in runtimes.items() if k != "device staged"}
    return {
        "step_rows": {
            k: (lambda rt=rt: rt.step_rows(slab, rows, *event)) for k, rt in runtimes.items()
        },
        "rebuild": {k: (lambda rt=rt: rt.rebuild(*window)) for k, rt in whole.items()},
        "top_k": {
            k: (lambda rt=rt: rt.top_k(vectors, TOP_K, exclude=seen)) for k, rt in whole.items()
        },
    }


def timings(
    runtimes: dict[str, EncoderRuntime], batches: list[int], reps: int, seed: int = 1
) -> list[dict[str, Any]]:
    """One row per (op, batch): the median ms on each runtime."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for batch in batches:
        for op, calls in cases(runtimes, batch, rng).items():
            ms = medians_ms(calls, reps)
            out.append({"op": op, "batch": batch, **{f"{k} ms": v for k, v in ms.items()}})
            print(f"  {op} batch {batch}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))
    return out


def table(rows: list[dict[str, Any]], provider: str) -> str:
    """The results side by side; "device" is ``provider``, "staged" the device with the staged
    step forced, cpu/device how many times faster the device is."""
    lines = [
        f"device = {provider}",
        f"{'op':<10} {'batch':>5} {'device ms':>10} {'cpu ms':>10} {'cpu/device':>10} "
        f"{'staged ms':>10}",
    ]
    for r in rows:
        dev, cpu, staged = r["device ms"], r["cpu ms"], r.get("device staged ms")
        line = f"{r['op']:<10} {r['batch']:>5} {dev:>10.3f} {cpu:>10.3f} {cpu / dev:>9.1f}x"
        lines.append(line if staged is None else f"{line} {staged:>10.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def machine() -> dict[str, str]:
    import onnxruntime as ort

    info = {"onnxruntime": ort.__version__, "cpu_count": str(os.cpu_count())}
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["gpu"] = out.stdout.strip()
    return info


def run(args: argparse.Namespace, bundle: Path) -> dict[str, object]:
    runtimes = load_runtimes(bundle, args.device, args.threads)
    dev = runtimes["device"]
    cpu = runtimes["cpu"]
    shape = {"d_model": dev.d_model, "receptive_field": dev.receptive_field, "n_items": dev.n_items}
    print(f"bundle {bundle} version {dev.version}: {shape}")
    print(
        f"device runtime: {dev.provider}, step {dev.step_mode}; "
        f"cpu runtime: {cpu.provider}, step {cpu.step_mode}"
    )
    diffs = parity(dev, cpu)
    maxima = {k: v for k, v in diffs.items() if k != "top_k_same_indices"}
    print(
        "parity, max abs diff device vs cpu: "
        + ", ".join(f"{k} {v:.2e}" for k, v in maxima.items())
        + f"; top_k indices equal {diffs['top_k_same_indices']:.1%}"
    )
    bad = {k: v for k, v in maxima.items() if not v < PARITY_TOL}
    if bad:
        sys.exit(f"error: device and cpu differ by more than {PARITY_TOL}: {bad}")
    rows = timings(runtimes, args.batches, args.reps)
    print(table(rows, dev.provider))
    return {
        "device": args.device,
        "provider": dev.provider,
        "step_mode": dev.step_mode,
        "machine": machine(),
        "bundle": {"version": dev.version, **shape},
        "parity": diffs,
        "reps": args.reps,
        "results": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", type=Path, help="default: export a random model")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 256, 2000])
    ap.add_argument("--reps", type=int, default=10, help="timed calls per case (median)")
    ap.add_argument("--n-items", type=int, default=3416, help="catalogue of a random model")
    ap.add_argument("--threads", type=int, help="ORT intra-op threads (default: the runtime's)")
    ap.add_argument("--out", type=Path, help="JSON results (default: $OUT/gpu.json if OUT set)")
    args = ap.parse_args()
    out = args.out or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else None)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        if args.bundle is None:
            t0 = time.perf_counter()
            bundle = export_random_bundle(Path(tmp), args.n_items)
            print(f"exported a random model in {time.perf_counter() - t0:.1f} s")
        elif (args.bundle / "manifest.json").is_file():
            bundle = args.bundle
        else:
            sys.exit(f"error: {args.bundle} is not a bundle (no manifest.json)")
        result = run(args, bundle)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
