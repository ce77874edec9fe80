"""Do event types (and item categories) help? An ablation on Taobao's typed UserBehavior log.

    python bench/behaviour.py                          # every variant, seeds 0 1 2
    python bench/behaviour.py --variants types no-types --seeds 0

Each variant is trained once per seed on two versions of the log and evaluated leave-one-out:

* next item: the log as it is; every user's last event (of any type) is the target, what the
  stream serves after every event;
* next purchase: each buyer's history cut after its last purchase, so that purchase is the
  target (users without one keep their whole history and train only); scored over the users
  whose target is a purchase.

Both are ranked under two seen-items rules (INTEREST_EXCLUDE_SEEN_TYPES): every seen item
excluded (the default) and only purchased ones (views, carts and favourites may come back).
Validation, which picks the checkpoint, ranks under the second rule: on this log a user's next
item is often one seen before, so excluding every seen item leaves validation nearly all zeros.

Why bootstrap intervals and a paired difference: a few hundred users, most of whose targets no
model can rank, so a run's mean moves with which users happened to be evaluated. Each user's
NDCG@10 and HR@10 are averaged over the seeds first; the interval resamples users, and the
difference to ``no-types`` is taken user by user before resampling, which cancels the users
every variant gets right or wrong alike.

Data: ../shared/data/taobao_userbehavior_dev.csv (or --data), a slice of Alibaba's UserBehavior
log for research use; never committed. Where it is missing the bench says so and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "taobao_userbehavior_dev.csv"
# name -> training overrides; "no-types" is the baseline the differences are taken against
VARIANTS: dict[str, dict[str, object]] = {
    "no-types": {"uses_event_types": False},
    "types": {},
    "types+purchase-weight": {"type_weights": {"purchase": 4.0}},
    "types+category": {"item_categories": True},
    "no-types+category": {"uses_event_types": False, "item_categories": True},
}
BASELINE = "no-types"
RULES = {"purchased": ("purchase",), "all seen": None}
SERVING_RULE = ("purchase",)  # what validation ranks under
TASKS = ("next item", "next purchase")


def purchase_cut(source: Path, out: Path) -> Path:
    """The log with each buyer's events after its last purchase dropped (UserBehavior lines,
    each user's in time order)."""
    users: dict[str, list[list[str]]] = {}
    with source.open(newline="") as f:
        for row in csv.reader(f):
            if row:
                users.setdefault(row[0], []).append(row)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        for rows in users.values():
            rows.sort(key=lambda r: int(r[4]))
            bought = [i for i, r in enumerate(rows) if r[3] == "buy"]
            writer.writerows(rows[: bought[-1] + 1] if bought else rows)
    return out


def user_ranks(model_dir: Path, data: Path, purchases_only: bool) -> dict[str, np.ndarray]:
    """Each evaluated user's 0-based target rank, per seen-items rule."""
    from encoder.evaluate import PURCHASE, exclusion_rule, prepare, rankings

    ev = prepare(model_dir, data, "test")
    keep = (ev.batch.target_types == PURCHASE).numpy() if purchases_only else slice(None)
    out = {}
    for name, rule in RULES.items():
        ranking = rankings(ev.model, ev.inter, ev.batch, "test", [None], 512, exclusion_rule(rule))
        out[name] = ranking[0].ranks[keep]
    return out


def run_variant(
    name: str, data: dict[str, Path], seeds: Sequence[int], work: Path, args: argparse.Namespace
) -> tuple[dict[tuple[str, str], list[np.ndarray]], float]:
    """Per (task, rule): each seed's per-user ranks; and the mean training minutes."""
    from encoder.train import train

    ranks: dict[tuple[str, str], list[np.ndarray]] = {}
    minutes = []
    for task, path in data.items():
        for seed in seeds:
            out = work / f"{name}-{task.replace(' ', '-')}-{seed}"
            summary = train(
                path,
                out,
                epochs=args.max_epochs,
                max_minutes=args.max_minutes,
                progress=False,
                seed=seed,
                threads=args.threads,
                batch_size=16,
                n_negatives=1024,
                exclude_seen_types=SERVING_RULE,
                **VARIANTS[name],
            )
            minutes.append(summary["train_minutes"])
            per_rule = user_ranks(out, path, purchases_only=task == "next purchase")
            for rule, r in per_rule.items():
                ranks.setdefault((task, rule), []).append(r)
            print(f"  {name} / {task} / seed {seed}: {summary['train_minutes']} min", flush=True)
    return ranks, float(np.mean(minutes))


def interval(values: np.ndarray, resamples: int) -> str:
    from encoder.metrics import bootstrap_interval

    low, high = bootstrap_interval(values, resamples)
    return f"{values.mean():.4f} [{low:.4f}, {high:.4f}]"


def table(
    results: dict[str, dict[tuple[str, str], list[np.ndarray]]], minutes: dict[str, float], n: int
) -> str:
    """One markdown row per (task, rule, variant): NDCG@10 and HR@10 with 95% intervals, the
    seeds' spread of NDCG@10, and the paired difference to the baseline."""
    from encoder.metrics import gains, hits

    lines = [
        "| task | rule | variant | users | NDCG@10 [95% CI] | HR@10 [95% CI] | NDCG@10 seeds "
        f"| NDCG@10 - {BASELINE} [95% CI] | HR@10 - {BASELINE} [95% CI] | train min |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        for rule in RULES:
            base = results.get(BASELINE, {}).get((task, rule))
            for name, per in results.items():
                runs = per[(task, rule)]
                g = np.mean([gains(r, 10) for r in runs], axis=0)
                h = np.mean([hits(r, 10) for r in runs], axis=0)
                seeds = [float(gains(r, 10).mean()) for r in runs]
                spread = f"{min(seeds):.4f}-{max(seeds):.4f}"
                if base is None or name == BASELINE:
                    dg = dh = "-"
                else:
                    dg = interval(g - np.mean([gains(r, 10) for r in base], axis=0), n)
                    dh = interval(h - np.mean([hits(r, 10) for r in base], axis=0), n)
                lines.append(
                    f"| {task} | {rule} | {name} | {len(g)} | {interval(g, n)} | "
                    f"{interval(h, n)} | {spread} | {dg} | {dh} | {minutes[name]:.2f} |"
                )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-epochs", type=int, default=15)
    parser.add_argument("--max-minutes", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    if not args.data.is_file():
        print(f"{args.data} not found: nothing to measure")
        return 0
    started = time.monotonic()
    results, minutes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = {"next item": args.data, "next purchase": purchase_cut(args.data, work / "cut.csv")}
        for name in args.variants:
            results[name], minutes[name] = run_variant(name, data, args.seeds, work, args)
    print(table(results, minutes, args.resamples))
    print(f"\nseeds {args.seeds}, {(time.monotonic() - started) / 60:.1f} min in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
