"""Incremental ONNX step vs full recompute of a 200-event history, batch 1 and 256, CPU.

Why: the worker updates a user per event. Recomputing the encoder over the whole window costs
O(history) per event; the step graph costs O(span) in the cache reads only, with a much smaller
constant. This measures both through ONNX Runtime on the CPU provider, in one run, and prints
the ratio (target: >= 20x).

    python bench/incremental.py [--history 200] [--batches 1 256] [--threads 2] [--spin]

The model is the encoder's default config, randomly initialised (weights do not change the
cost). "graph" rows time the bare ONNX sessions; "api" rows time EncoderRuntime.rebuild and
step_in_place, i.e. with the runtime's padding and bookkeeping (the worker now steps its slab
in place with step_rows instead: bench/staged_step.py compares the two). Times are medians;
the ratio is the median of per-pair ratios (see paired_medians), so it is not exactly
full ms / step ms.
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

    Why the ratio per pair: this VM runs fast and slow spells of a second or more (batch-1
    steps in one run spread from ~85 to ~150 us), and a full block and the step block right
    after it share a spell, so their ratio cancels it where a ratio of two medians does not.
    """
    ratios = [f / s for f, s in zip(full, step, strict=True)]
    return statistics.median(full), statistics.median(step), statistics.median(ratios)


def _compare(
    full: Callable[[], object], step: Callable[[], object], min_blocks: int, min_seconds: float
) -> tuple[float, float, float]:
    times = interleaved_blocks({"full": full, "step": step}, min_blocks, min_seconds)
    return paired_medians(times["full"], times["step"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--history", type=int, default=200)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    ap.add_argument("--spin", action="store_true", help="let ORT threads spin between runs")
    ap.add_argument("--n-items", type=int, default=3416, help="catalogue size (ml-1m: 3416)")
    ap.add_argument("--n-layers", type=int, help="default: EncoderConfig's")
    ap.add_argument("--span", type=int, help="default: EncoderConfig's")
    ap.add_argument("--repeats", type=int, default=15, help="minimum timed block pairs per case")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum seconds per case")
    args = ap.parse_args()

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
            args.seconds,
        )
        # api level: what the worker calls (full recompute = rebuild from the whole window)
        a_full, a_step, a_ratio = _compare(
            lambda w=(items, types, gaps, memory): rt.rebuild(*w),
            lambda s=states, e=nxt: rt.step_in_place(s, *e),  # the worker's path
            args.repeats,
            args.seconds,
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


if __name__ == "__main__":
    main()
