"""Offline quality bench: train with the default settings, then evaluate (leave-one-out, full
ranking, seen items excluded) on ml-1m and Amazon Beauty; prints metrics and training minutes.

    python bench/quality.py                         # both data sets, defaults (about 1 hour)
    python bench/quality.py --data ml-1m --seeds 0 1 2  # three runs, then their mean and sd
    python bench/quality.py --data ml-1m --ablation # also ml-1m without the long-term memory
    python bench/quality.py --data beauty --published-protocol  # also as SASRec-CE was trained

Why several seeds: on ml-1m two seeds of the same defaults differ by ~0.003 NDCG@10, more than
most tuning changes, so one run cannot tell a change from luck; the bar is judged on the mean.

Data comes from ../shared/data (never committed; MovieLens terms forbid redistribution). Where
it is missing the bench says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA_DIR = ROOT.parent / "shared" / "data"
DATA_SETS = {"ml-1m": "ml-1m.txt", "beauty": "beauty.txt"}
BAR = {"ml-1m": {"ndcg@10": 0.18, "hr@10": 0.31}, "beauty": {"ndcg@10": 0.033}}
VARIANT_TAGS = {"use_memory": "-no-memory", "train_on_validation": "-published-protocol"}
SHOWN = (
    "ndcg@10",
    "hr@10",
    "ndcg@20",
    "hr@20",
    "map@10",
    "mrr",
    "sampled_hr@10",
    "sampled_ndcg@10",
    "coverage@10",
)


def run_one(
    name: str, path: Path, out: Path, max_minutes: float | None, seed: int = 0, **overrides
) -> dict:
    from encoder.evaluate import evaluate
    from encoder.train import train

    t0 = time.monotonic()
    summary = train(
        path, out, max_minutes=max_minutes, progress=sys.stderr.isatty(), seed=seed, **overrides
    )
    metrics = evaluate(out, path)
    row = {
        "data": name,
        "variant": ",".join(f"{k}={v}" for k, v in overrides.items()) or "default",
        "seed": seed,
        "train_minutes": summary["train_minutes"],
        "epochs": summary["epochs"],
        "best_epoch": summary["best_epoch"],
        "stopped": summary["stopped"],
        "total_minutes": round((time.monotonic() - t0) / 60, 2),
        **{k: round(metrics[k], 4) for k in SHOWN if k in metrics},
    }
    bar = BAR.get(name, {})
    row["bar_met"] = all(metrics[k] >= v for k, v in bar.items()) if bar else None
    return row


def seed_summary(rows: list[dict]) -> dict:
    """Mean and sample sd over two or more runs that differ only by seed; the bar is judged on
    the mean."""
    first = rows[0]
    out: dict = {"data": first["data"], "variant": first["variant"], "seeds": len(rows)}
    for k in SHOWN:
        values = [r[k] for r in rows if k in r]
        if values:
            out[k] = round(statistics.fmean(values), 4)
            out[k + "_sd"] = round(statistics.stdev(values), 4)
    bar = BAR.get(first["data"], {})
    out["bar_met_by_mean"] = all(out[k] >= v for k, v in bar.items()) if bar else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="*", default=list(DATA_SETS), choices=list(DATA_SETS))
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--max-minutes", type=float, default=None, help="override the default")
    ap.add_argument("--ablation", action="store_true", help="also train ml-1m without memory")
    ap.add_argument(
        "--published-protocol",
        action="store_true",
        help="also train with every user's validation event held out, as the published "
        "SASRec numbers were (the default trains on those outside the validation sample)",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed")
    ap.add_argument("--out", type=Path, default=None, help="keep the models here")
    args = ap.parse_args()

    if not args.data_dir.is_dir():
        print(
            f"skipped: {args.data_dir} not found (the data sets are not committed; see "
            "../shared/data/SOURCES.md)"
        )
        return 0
    out_root = args.out or Path(tempfile.mkdtemp(prefix="quality-"))
    for name in args.data:
        path = args.data_dir / DATA_SETS[name]
        if not path.is_file():
            print(f"skipped {name}: {path} not found")
            continue
        variants: list[dict] = [{}]
        if args.ablation and name == "ml-1m":
            variants.append({"use_memory": False})
        if args.published_protocol:
            variants.append({"train_on_validation": False})
        for over in variants:
            tag = name + "".join(VARIANT_TAGS[k] for k in over)
            runs = []
            for seed in args.seeds:
                model_dir = out_root / (tag if len(args.seeds) == 1 else f"{tag}-seed{seed}")
                row = run_one(name, path, model_dir, args.max_minutes, seed=seed, **over)
                runs.append(row)
                print(json.dumps(row), flush=True)
            if len(runs) > 1:
                print(json.dumps(seed_summary(runs)), flush=True)
    print(f"models in {out_root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
