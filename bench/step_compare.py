"""Step and full graphs of several bundles, timed interleaved in one process (an A/B of exports).

Why: a change to the exported graphs is judged against the previous export, and on this
noisy machine two separate runs of bench/incremental.py differ by more than the change. Every
bundle's full.onnx and step.onnx run in alternating ~50 ms blocks; each prints the median
time per call and the median per-pair ratio (as bench/incremental.py).

    python bench/step_compare.py OLD_BUNDLE NEW_BUNDLE [...] [--batches 1 256] [--seconds 20]

Bundles come from `interest export` (a bundle of an older commit: check it out, export, come
back). Only onnxruntime and numpy are used, so old and new bundles load side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.runtime import session_options


def _graphs(bundle: Path, batch: int, history: int, threads: int, seed: int):
    """(full call, step call) for one bundle on a random history of ``history`` events."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    so = session_options(threads)
    providers = ["CPUExecutionProvider"]
    full = ort.InferenceSession(str(bundle / "full.onnx"), so, providers=providers)
    step = ort.InferenceSession(str(bundle / "step.onnx"), so, providers=providers)
    cfg = manifest["config"]
    rng = np.random.default_rng(seed)
    items = rng.integers(1, cfg["n_items"] + 1, (batch, history))
    types = rng.integers(0, cfg["n_event_types"], (batch, history))
    gaps = rng.integers(0, cfg["n_time_buckets"], (batch, history))
    full_feeds = {
        "items": items,
        "types": types,
        "gaps": gaps,
        "memory_in": rng.normal(size=(batch, cfg["d_model"])).astype(np.float32),
        "has_memory": np.ones(batch, dtype=bool),
    }
    state = full.run(None, full_feeds)[1:]
    names = [i.name for i in step.get_inputs()]
    step_feeds = dict(zip(names, [items[:, -1], types[:, -1], gaps[:, -1], *state], strict=True))
    return (lambda: full.run(None, full_feeds)), (lambda: step.run(None, step_feeds))


def _calls_per_block(fn: Callable[[], object], block_seconds: float) -> int:
    t0 = time.perf_counter()
    fn()
    return max(1, round(block_seconds / max(time.perf_counter() - t0, 1e-6)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", type=Path, nargs="+")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--history", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds per batch size")
    args = ap.parse_args()
    for b in args.bundles:
        if not (b / "manifest.json").is_file():
            sys.exit(f"error: {b} is not a bundle (no manifest.json)")

    print(f"{'batch':>5} {'bundle':<40} {'full ms':>9} {'step ms':>9} {'ratio':>7}")
    for batch in args.batches:
        calls = {}
        for b in args.bundles:
            full, step = _graphs(b, batch, args.history, args.threads, seed=0)
            calls[(b, "full")], calls[(b, "step")] = full, step
        for fn in calls.values():
            for _ in range(3):
                fn()
        per_block = {k: _calls_per_block(fn, 0.05) for k, fn in calls.items()}
        times: dict[tuple[Path, str], list[float]] = {k: [] for k in calls}
        started = time.perf_counter()
        while time.perf_counter() - started < args.seconds:
            for k, fn in calls.items():
                t0 = time.perf_counter()
                for _ in range(per_block[k]):
                    fn()
                times[k].append((time.perf_counter() - t0) / per_block[k])
        for b in args.bundles:
            full_t, step_t = times[(b, "full")], times[(b, "step")]
            ratio = statistics.median(f / s for f, s in zip(full_t, step_t, strict=True))
            print(
                f"{batch:>5} {str(b)[-40:]:<40} {statistics.median(full_t) * 1e3:>9.3f} "
                f"{statistics.median(step_t) * 1e3:>9.3f} {ratio:>6.1f}x"
            )


if __name__ == "__main__":
    main()
