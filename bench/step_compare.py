"""Step and full graphs of several bundles, timed interleaved in one process (an A/B of exports).

Why: a change to the exported graphs is judged against the previous export, and on this
noisy machine two separate runs of bench/incremental.py differ by more than the change. Every
bundle's full.onnx and step.onnx take turns in ~50 ms blocks; each prints the median time per
call and the median per-pair ratio (bench/incremental.py's interleaved_blocks and
paired_medians).

    python bench/step_compare.py OLD_BUNDLE NEW_BUNDLE [...] [--batches 1 256] [--seconds 20]

Bundles come from `interest export` (a bundle of an older commit: check it out, export, come
back). Only onnxruntime and numpy are used, so old and new bundles load side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.incremental import interleaved_blocks, paired_medians
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
        for i, b in enumerate(args.bundles):
            calls[f"{i} full"], calls[f"{i} step"] = _graphs(
                b, batch, args.history, args.threads, seed=0
            )
        times = interleaved_blocks(calls, min_blocks=3, min_seconds=args.seconds)
        for i, b in enumerate(args.bundles):
            full, step, ratio = paired_medians(times[f"{i} full"], times[f"{i} step"])
            print(
                f"{batch:>5} {str(b)[-40:]:<40} {full * 1e3:>9.3f} {step * 1e3:>9.3f} "
                f"{ratio:>6.1f}x"
            )


if __name__ == "__main__":
    main()
