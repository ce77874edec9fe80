"""Offline quality bench: train with the default settings, then evaluate (leave-one-out, full
ranking, seen items excluded) on ml-1m and Amazon Beauty; prints metrics and training minutes.

    python bench/quality.py                         # both data sets, defaults (about 1 hour)
    python bench/quality.py --data ml-1m --seeds 0 1 2  # three runs, then their mean and sd
    python bench/quality.py --data ml-1m --ablation # also ml-1m without the long-term memory
    python bench/quality.py --data beauty --published-protocol  # also as SASRec-CE was trained
    python bench/quality.py --data ml-1m --fit-gap  # also NDCG@10 on training targets

Why several seeds: two seeds of the same defaults differ by more than most tuning changes, so
one run cannot tell a change from luck; the bar is judged on the mean.

Why --fit-gap: ranking targets the model trained on beside the validation and test targets
shows how much it memorises; a large gap says regularisation (weight decay, dropout) may help
more than capacity. For a model trained elsewhere: ``fit_gap(model_dir, data_path)``.

Data: ml-1m.txt and beauty.txt (SASRec's `user item` lines) in ../shared/data, or --data-dir.
They are never committed (MovieLens terms forbid redistribution); where they are missing the
bench says so and exits 0.
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
    name: str,
    path: Path,
    out: Path,
    max_minutes: float | None,
    seed: int = 0,
    with_fit_gap: bool = False,
    **overrides,
) -> dict:
    """Train on ``path`` into ``out`` with the defaults but ``overrides``, evaluate, and return
    one result row."""
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
    if with_fit_gap:
        row["fit_gap_ndcg@10"] = fit_gap(out, path)
    return row


def fit_gap(model_dir: Path, data: Path) -> dict[str, float]:
    """NDCG@10 (full ranking, seen items excluded) of each user's 6th- and 4th-to-last events
    (training targets), 2nd-to-last (validation) and last (test), each ranked from the events
    before it as `interest evaluate` ranks the test event. Users with too few events for a row
    are left out of it, so on short-history logs the training rows cover fewer users."""
    from encoder.data import (
        Interactions,
        UserSequence,
        eval_batch,
        load_interactions,
        memory_horizon,
    )
    from encoder.evaluate import load_model, rank_split

    model, item_ids = load_model(model_dir)
    cfg = model.cfg
    inter = load_interactions(data, item_ids=item_ids, n_time_buckets=cfg.n_time_buckets)
    prefix = memory_horizon(cfg.memory_decay) if cfg.use_memory else 0

    def ndcg_at(dropped: int, split: str) -> float:
        """NDCG@10 of the ``split`` target after dropping each user's last ``dropped`` events."""
        cut = Interactions(
            inter.user_ids,
            inter.item_ids,
            [
                UserSequence(*(a[: len(a) - dropped] for a in (s.items, s.types, s.gaps)))
                for s in inter.sequences
            ],
        )
        batch = eval_batch(cut, split, cfg.max_len, prefix)
        return round(rank_split(model, cut, batch, split)["ndcg@10"], 4)

    return {
        "train (6th to last)": ndcg_at(4, "valid"),
        "train (4th to last)": ndcg_at(2, "valid"),
        "validation": ndcg_at(0, "valid"),
        "test": ndcg_at(0, "test"),
    }


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
    ap.add_argument(
        "--fit-gap",
        action="store_true",
        help="also rank training targets with each trained model (how much it memorises)",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed")
    ap.add_argument("--out", type=Path, default=None, help="keep the models here")
    args = ap.parse_args()

    if not args.data_dir.is_dir():
        print(f"skipped: {args.data_dir} not found (the data sets are not committed)")
        return 0
    out_root = args.out or Path(tempfile.mkdtemp(prefix="quality-"))
    for name in args.data:
        path = args.data_dir / DATA_SETS[name]
        if not path.is_file():
            print(f"skipped {name}: {path} not found (the data sets are not committed)")
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
                row = run_one(
                    name,
                    path,
                    model_dir,
                    args.max_minutes,
                    seed=seed,
                    with_fit_gap=args.fit_gap,
                    **over,
                )
                runs.append(row)
                print(json.dumps(row), flush=True)
            if len(runs) > 1:
                print(json.dumps(seed_summary(runs)), flush=True)
    print(f"models in {out_root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
