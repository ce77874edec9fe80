"""Incremental ONNX step vs full recompute of a 200-event history, batch 1 and 256, CPU.

Why: the worker updates a user per event. Recomputing the encoder over the whole window costs
O(history) per event; the step graph costs O(span) in the cache reads only, with a much smaller
constant. This measures both through ONNX Runtime on the CPU provider, in one run, and prints
the ratio full / step.

    python bench/incremental.py [--history 200] [--batches 1 256] [--threads 2] [--spin]
                                [--n-layers N --span S]
    python bench/incremental.py --bundles OLD_BUNDLE NEW_BUNDLE [...] [--seconds 20]

Default: the encoder's default config, randomly initialised (weights do not change the cost),
exported to a temporary bundle. "graph" rows time the bare ONNX sessions (full.onnx, step.onnx);
"api" rows time ``EncoderRuntime.rebuild`` and ``step_in_place`` (step.onnx, the reference
step), i.e. with the runtime's padding and bookkeeping. The worker's own step
(``step_rows``, in place in its slab) is timed inside bench/batch.py's recommend stage.

``--bundles``: an A/B of exports. Every given bundle's full.onnx and step.onnx take turns in
one process, so a change to the exported graphs is judged against the previous export on the
same machine at the same moment (two separate runs on this machine differ by more than most
graph changes). Bundles come from `interest export`; a bundle of an older commit: check it
out, export, come back. Only onnxruntime and numpy touch the bundles, so old and new formats
load side by side.

Times are medians; the ratio is the median of per-pair ratios (see paired_medians), so it is
not exactly full ms / step ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_SECONDS = 3.0  # per case with a fresh model
BUNDLES_SECONDS = 20.0  # per batch size with --bundles: more calls take turns


def _calls_per_block(fn: Callable[[], object], block_seconds: float) -> int:
    t0 = time.perf_counter()
    fn()
    return max(1, round(block_seconds / max(time.perf_counter() - t0, 1e-6)))


def interleaved_blocks(
    calls: dict[str, Callable[[], object]],
    min_blocks: int,
    min_seconds: float,
    block_seconds: float = 0.05,
) -> dict[str, list[float]]:
    """Seconds per call of each function, per block, the functions taking turns in blocks of
    ~``block_seconds``, after three untimed warm-up calls each.

    Why take turns: the machine is shared, and load that comes and goes would otherwise land
    on one side of a comparison only. Why blocks rather than single calls: a step right after
    a full recompute would run on caches the full run evicted, which is not how a worker steps
    batch after batch.
    """
    for fn in calls.values():
        for _ in range(3):
            fn()
    per_block = {k: _calls_per_block(fn, block_seconds) for k, fn in calls.items()}
    times: dict[str, list[float]] = {k: [] for k in calls}
    started = time.perf_counter()
    while min(map(len, times.values())) < min_blocks or time.perf_counter() - started < min_seconds:
        for k, fn in calls.items():
            t0 = time.perf_counter()
            for _ in range(per_block[k]):
                fn()
            times[k].append((time.perf_counter() - t0) / per_block[k])
    return times


def paired_medians(full: list[float], step: list[float]) -> tuple[float, float, float]:
    """Median seconds per call of full and of step, and the median over block pairs of
    full / step.

    Why the ratio per pair: this VM runs fast and slow spells of a second or more, and a full
    block and the step block right after it share a spell, so their ratio cancels it where a
    ratio of two medians does not.
    """
    ratios = [f / s for f, s in zip(full, step, strict=True)]
    return statistics.median(full), statistics.median(step), statistics.median(ratios)


def _compare(
    full: Callable[[], object], step: Callable[[], object], min_blocks: int, min_seconds: float
) -> tuple[float, float, float]:
    times = interleaved_blocks({"full": full, "step": step}, min_blocks, min_seconds)
    return paired_medians(times["full"], times["step"])


def fresh_model(args: argparse.Namespace) -> None:
    """Graph and api rows for a randomly initialised model of the default (or given) shape."""
    import torch

    from encoder.model import EncoderConfig, InterestEncoder
    from export.bundle import export_bundle, save_model_dir
    from export.runtime import EncoderRuntime

    torch.manual_seed(0)
    shape = {k: v for k, v in (("n_layers", args.n_layers), ("span", args.span)) if v is not None}
    cfg = EncoderConfig(n_items=args.n_items, **shape)
    model = InterestEncoder(cfg).eval()
    with (
        tempfile.TemporaryDirectory(prefix="bench-incremental-") as tmp_name,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        tmp = Path(tmp_name)
        model_dir = save_model_dir(model, [str(i) for i in range(1, cfg.n_items + 1)], tmp / "m")
        bundle = export_bundle(model_dir=model_dir, out=tmp / "bundle")
        # sessions hold the graphs in memory: the directory can go once they are loaded
        rt = EncoderRuntime.load(
            bundle, device="cpu", intra_op_threads=args.threads, spin=args.spin
        )
    print(
        f"config: d_model={cfg.d_model} n_layers={cfg.n_layers} n_heads={cfg.n_heads} "
        f"span={cfg.span} receptive_field={cfg.receptive_field} n_items={cfg.n_items}; "
        f"provider={rt.provider} threads={args.threads} spin={args.spin} history={args.history}"
    )
    seconds = args.seconds if args.seconds is not None else DEFAULT_SECONDS

    rng = np.random.default_rng(0)
    results = []
    for batch in args.batches:
        T = args.history
        items = rng.integers(1, cfg.n_items + 1, (batch, T))
        types = rng.integers(0, cfg.n_event_types, (batch, T))
        gaps = rng.integers(0, cfg.n_time_buckets, (batch, T))
        memory = rng.normal(size=(batch, cfg.d_model)).astype(np.float32)
        has = np.ones(batch, dtype=bool)
        nxt = (items[:, -1], types[:, -1], gaps[:, -1])
        _, states = rt.rebuild(items[:, :-1], types[:, :-1], gaps[:, :-1], memory)

        # graph level: the full window through full.onnx vs one event through step.onnx
        full_feeds = {
            "items": items,
            "types": types,
            "gaps": gaps,
            "memory_in": memory,
            "has_memory": has,
        }
        step_feeds = {"items": nxt[0], "types": nxt[1], "gaps": nxt[2]}
        step_feeds.update({f"in_{n}": a for n, a in states.arrays.items()})
        t_full, t_step, ratio = _compare(
            lambda f=full_feeds: rt._full.run(None, f),
            lambda f=step_feeds: rt._step.run(None, f),
            args.repeats,
            seconds,
        )
        # api level: the runtime's calls (full recompute = rebuild from the whole window)
        a_full, a_step, a_ratio = _compare(
            lambda w=(items, types, gaps, memory): rt.rebuild(*w),
            lambda s=states, e=nxt: rt.step_in_place(s, *e),
            args.repeats,
            seconds,
        )
        for level, full_s, step_s, r in (
            ("graph", t_full, t_step, ratio),
            ("api", a_full, a_step, a_ratio),
        ):
            results.append(
                {
                    "batch": batch,
                    "level": level,
                    "full_ms": full_s * 1e3,
                    "step_ms": step_s * 1e3,
                    "ratio": r,
                    "full_users_per_s": batch / full_s,
                    "step_users_per_s": batch / step_s,
                }
            )

    print(f"{'batch':>5} {'level':>5} {'full ms':>9} {'step ms':>9} {'ratio':>7} "
          f"{'full users/s':>13} {'step users/s':>13}")  # fmt: skip
    for r in results:
        print(
            f"{r['batch']:>5} {r['level']:>5} {r['full_ms']:>9.3f} {r['step_ms']:>9.3f} "
            f"{r['ratio']:>6.1f}x {r['full_users_per_s']:>13,.0f} {r['step_users_per_s']:>13,.0f}"
        )
    meta = {"history": args.history, "threads": args.threads, "spin": args.spin}
    print(json.dumps({**meta, "results": results}))


def bundle_graphs(
    bundle: Path, batch: int, history: int, threads: int, spin: bool, seed: int
) -> tuple[Callable[[], object], Callable[[], object]]:
    """(full call, step call) for one bundle on a random history of ``history`` events,
    through the bundle's own files: an older export needs none of this tree's runtime."""
    import onnxruntime as ort

    from export.runtime import session_options

    manifest = json.loads((bundle / "manifest.json").read_text())
    so = session_options(threads, spin=spin)
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
    # full.onnx's outputs after the vector are the state, in step.onnx's input order
    state = full.run(None, full_feeds)[1:]
    names = [i.name for i in step.get_inputs()]
    step_feeds = dict(zip(names, [items[:, -1], types[:, -1], gaps[:, -1], *state], strict=True))
    return (lambda: full.run(None, full_feeds)), (lambda: step.run(None, step_feeds))


def compare_bundles(args: argparse.Namespace) -> None:
    """Graph rows for each of ``args.bundles``, all bundles taking turns in one process."""
    for b in args.bundles:
        if not (b / "manifest.json").is_file():
            sys.exit(f"error: {b} is not a bundle (no manifest.json)")
    seconds = args.seconds if args.seconds is not None else BUNDLES_SECONDS
    print(f"threads={args.threads} spin={args.spin} history={args.history}")
    print(f"{'batch':>5} {'bundle':<40} {'full ms':>9} {'step ms':>9} {'ratio':>7}")
    for batch in args.batches:
        calls = {}
        for i, b in enumerate(args.bundles):
            calls[f"{i} full"], calls[f"{i} step"] = bundle_graphs(
                b, batch, args.history, args.threads, args.spin, seed=0
            )
        times = interleaved_blocks(calls, min_blocks=args.repeats, min_seconds=seconds)
        for i, b in enumerate(args.bundles):
            full, step, ratio = paired_medians(times[f"{i} full"], times[f"{i} step"])
            print(
                f"{batch:>5} {str(b)[-40:]:<40} {full * 1e3:>9.3f} {step * 1e3:>9.3f} "
                f"{ratio:>6.1f}x"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--history", type=int, default=200)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    ap.add_argument("--spin", action="store_true", help="let ORT threads spin between runs")
    ap.add_argument("--n-items", type=int, default=3416, help="catalogue size (ml-1m: 3416)")
    ap.add_argument("--n-layers", type=int, help="default: EncoderConfig's")
    ap.add_argument("--span", type=int, help="default: EncoderConfig's")
    ap.add_argument("--repeats", type=int, default=15, help="minimum timed blocks per call")
    ap.add_argument(
        "--seconds",
        type=float,
        default=None,
        help=f"minimum seconds per case (default {DEFAULT_SECONDS:g}; with --bundles, per batch"
        f" size, {BUNDLES_SECONDS:g})",
    )
    ap.add_argument(
        "--bundles",
        type=Path,
        nargs="+",
        help="time these exported bundles' graphs side by side instead of a fresh model",
    )
    args = ap.parse_args()
    if args.bundles:
        compare_bundles(args)
    else:
        fresh_model(args)


if __name__ == "__main__":
    main()
