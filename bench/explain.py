"""Faithfulness of the explanations (export/explain.py) on ml-1m: does taking out the event that
leave-one-out weighs highest lower the recommended item's score and rank more than taking out
a random event, the most recent one, or the event an item-similarity baseline points at?

    python bench/explain.py [--model BUNDLE] [--users 2000] [--window 200] [--seed 0]

Per sampled user (seeded): the window is the last --window events of the training history
(the last two events, validation and test, left out as bench/quality.py's split leaves them),
the memory is the long-term memory after the whole training history, and the target is the
top-1 item for that window and memory (the window's items excluded). One event is taken out of
the window, four ways: (a) leave-one-out's top event, (b) a random event, (c) the most recent
event, (d) the window item whose embedding is most cosine-similar to the target's. The target
is rescored as the model scores the window without that event (export/explain.py's variants:
the token gone, the memory without its share), and ranked among all items, the window's items
still excluded so that only the score moves the rank.

The window and all its one-event-less variants of a few users go through one rebuild, so
leave-one-out's weights and the four rescored vectors come from the same call.

Data: ../shared/data/ml-1m.txt (SASRec's `user item` lines; never committed, and where it is
missing the bench says so and exits 0). The bundle: found as bench/stream.py finds it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.stream import DATA, find_bundle, load_histories  # noqa: E402
from export.explain import _memories_without, _variants, leave_one_out  # noqa: E402
from export.runtime import EncoderRuntime  # noqa: E402

STRATEGIES = ("leave-one-out top", "random", "most recent", "similarity baseline")
TOP_N = 10  # "out of top-10": how often one event's removal pushes the target that far


@dataclass(frozen=True)
class UserCase:
    """One user's window (model indices, oldest first) and memory after the training history."""

    window: np.ndarray
    memory: np.ndarray


@dataclass(frozen=True)
class Removal:
    """What taking one event out did to the target: score drop, rank before and after."""

    position: int
    score_drop: float
    rank_before: int
    rank_after: int

    @property
    def rank_drop(self) -> int:
        return self.rank_after - self.rank_before


def training_histories(
    rt: EncoderRuntime, histories: dict[str, list[str]], n_users: int, seed: int
) -> list[np.ndarray]:
    """Model indices of the training history (all but the last two events) of ``n_users``
    users drawn at random; items the model does not know carry no weight: dropped."""
    rows = []
    for items in histories.values():
        idx = rt.index_of(items[:-2])
        idx = idx[idx > 0]
        if len(idx) >= 2:  # one event left after a removal
            rows.append(idx)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(rows), size=min(n_users, len(rows)), replace=False)
    return [rows[i] for i in sorted(chosen.tolist())]


def long_term_memories(rt: EncoderRuntime, histories: list[np.ndarray], chunk: int) -> np.ndarray:
    """(N, d): the memory after each whole history, rebuilt from it; similar lengths share a
    call, so little of a call is padding."""
    out = np.zeros((len(histories), rt.d_model), np.float32)
    order = np.argsort([len(h) for h in histories], kind="stable")
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        zeros = [np.zeros(len(histories[r]), np.int64) for r in rows]
        _, states = rt.rebuild([histories[r] for r in rows], zeros, zeros, memory=None)
        out[rows] = states.memory
    return out


def variant_inputs(rt: EncoderRuntime, case: UserCase) -> tuple[list[np.ndarray], np.ndarray]:
    """Rows (the window, then the window without each event) and their memories, built as
    leave_one_out builds them. ml-1m has no timestamps: every gap is the unknown one."""
    window = case.window
    zeros = np.zeros(len(window), np.int64)
    dropped = np.arange(len(window))
    v_items, _, _ = _variants(window, zeros, zeros, zeros, dropped, rt.n_time_buckets, False)
    memories = _memories_without(rt, window, case.memory, dropped)
    return [window, *v_items], memories


def rank_of(emb: np.ndarray, vector: np.ndarray, target: int, excluded: np.ndarray) -> int:
    """Items scoring above the target (0 = first), padding and ``excluded`` left out."""
    scores = emb @ vector
    above = scores > scores[target]
    above[0] = False
    above[excluded] = False
    return int(above.sum())


def pick_events(
    emb: np.ndarray, window: np.ndarray, target: int, weights: np.ndarray, rng: np.random.Generator
) -> dict[str, int]:
    """Window position each strategy takes out."""
    items = emb[window]
    cosine = items @ emb[target] / (np.linalg.norm(items, axis=1) * np.linalg.norm(emb[target]))
    return {
        "leave-one-out top": int(np.argmax(weights)),
        "random": int(rng.integers(len(window))),
        "most recent": len(window) - 1,
        "similarity baseline": int(np.argmax(cosine)),
    }


def run_batch(
    rt: EncoderRuntime, emb: np.ndarray, cases: list[UserCase], rng: np.random.Generator
) -> tuple[list[dict[str, Removal]], list[tuple[int, np.ndarray]]]:
    """One rebuild for the windows and variants of ``cases``; per user, each strategy's
    removal, and (target, leave-one-out weights) for the check against leave_one_out.
    ``emb``: the item embeddings in float64, as leave_one_out scores (a weight is a difference
    of two nearly equal scores)."""
    rows: list[np.ndarray] = []
    memories = []
    starts = []
    for case in cases:
        r, m = variant_inputs(rt, case)
        starts.append(len(rows))
        rows += r
        memories.append(m)
    zeros = [np.zeros(len(r), np.int64) for r in rows]
    vectors, _ = rt.rebuild(rows, zeros, zeros, memory=np.concatenate(memories))
    targets, _ = rt.top_k(vectors[starts], 1, exclude=[c.window for c in cases])
    results, weights_of = [], []
    for case, start, target in zip(cases, starts, targets[:, 0].tolist(), strict=True):
        block = vectors[start : start + 1 + len(case.window)].astype(np.float64)
        scores = block @ emb[target]
        weights = scores[0] - scores[1:]  # as leave_one_out: the score drop per event
        before = rank_of(emb, block[0], target, case.window)
        picks = pick_events(emb, case.window, target, weights, rng)
        results.append(
            {
                name: Removal(
                    p, float(weights[p]), before, rank_of(emb, block[1 + p], target, case.window)
                )
                for name, p in picks.items()
            }
        )
        weights_of.append((target, weights))
    return results, weights_of


def check_against_leave_one_out(
    rt: EncoderRuntime, case: UserCase, target: int, weights: np.ndarray
) -> None:
    """The batched variants must be leave_one_out's own: same weights for one user."""
    zeros = np.zeros(len(case.window), np.int64)
    _, expected = leave_one_out(
        rt, case.window, zeros, zeros, case.memory, np.array([target]), use_gaps=False
    )
    if not np.allclose(expected[0], weights, atol=1e-4):
        worst = float(np.abs(expected[0] - weights).max())
        raise SystemExit(f"error: batched weights differ from leave_one_out's by {worst:.2e}")


def summarize(results: list[dict[str, Removal]]) -> dict[str, dict[str, float]]:
    """Per strategy: drops, and how often its drop beats random's and most recent's."""

    def share(flags: list[bool]) -> float:
        return round(sum(flags) / len(flags), 4)

    out: dict[str, dict[str, float]] = {}
    for name in STRATEGIES:
        score = [r[name].score_drop for r in results]
        rank = [r[name].rank_drop for r in results]
        row = {
            "mean_score_drop": round(statistics.fmean(score), 4),
            "median_score_drop": round(statistics.median(score), 4),
            "mean_rank_drop": round(statistics.fmean(rank), 2),
            "median_rank_drop": statistics.median(rank),
            f"out_of_top_{TOP_N}": share([r[name].rank_after >= TOP_N for r in results]),
            "same_event_as_leave_one_out": share(
                [r[name].position == r["leave-one-out top"].position for r in results]
            ),
        }
        for other, tag in (("random", "random"), ("most recent", "recent")):
            if other == name:
                continue
            row[f"score_drop_gt_{tag}"] = share(
                [r[name].score_drop > r[other].score_drop for r in results]
            )
            row[f"rank_drop_gt_{tag}"] = share(
                [r[name].rank_drop > r[other].rank_drop for r in results]
            )
            row[f"rank_drop_eq_{tag}"] = share(
                [r[name].rank_drop == r[other].rank_drop for r in results]
            )
        out[name] = row
    return out


HEAD_TO_HEAD = (
    ("leave-one-out top", "random"),
    ("leave-one-out top", "most recent"),
    ("leave-one-out top", "similarity baseline"),
    ("similarity baseline", "random"),
    ("similarity baseline", "most recent"),
)


def head_to_head(results: list[dict[str, Removal]]) -> dict[str, dict[str, float]]:
    """A against B over the users where they take out different events (where they pick the
    same one, both drops are equal and say nothing about which picks better)."""
    out: dict[str, dict[str, float]] = {}
    for a, b in HEAD_TO_HEAD:
        rows = [r for r in results if r[a].position != r[b].position]
        n = max(1, len(rows))
        out[f"{a} vs {b}"] = {
            "users": len(rows),
            "score_drop_larger": round(sum(r[a].score_drop > r[b].score_drop for r in rows) / n, 4),
            "rank_drop_larger": round(sum(r[a].rank_drop > r[b].rank_drop for r in rows) / n, 4),
            "rank_drop_equal": round(sum(r[a].rank_drop == r[b].rank_drop for r in rows) / n, 4),
            "rank_drop_smaller": round(sum(r[a].rank_drop < r[b].rank_drop for r in rows) / n, 4),
        }
    return out


def print_head_to_head(pairs: dict[str, dict[str, float]]) -> None:
    print(
        f"{'where A and B take out different events':<42} {'users':>6} {'A score drop':>13}"
        f" {'A rank drop >':>14} {'=':>6} {'<':>6}"
    )
    for name, row in pairs.items():
        print(
            f"{name:<42} {row['users']:>6} {row['score_drop_larger']:>13.1%}"
            f" {row['rank_drop_larger']:>14.1%} {row['rank_drop_equal']:>6.1%}"
            f" {row['rank_drop_smaller']:>6.1%}"
        )


def print_table(summary: dict[str, dict[str, float]]) -> None:
    def cell(row: dict[str, float], key: str) -> str:
        return f"{row[key]:.1%}" if key in row else "-"

    head = (
        f"{'event taken out':<20} {'score drop':>17} {'rank drop':>13} {'out of':>7}"
        f" {'score drop >':>15} {'rank drop >':>15} {'same as':>8}"
    )
    sub = (
        f"{'':<20} {'mean':>8} {'median':>8} {'mean':>6} {'median':>6} {'top-' + str(TOP_N):>7}"
        f" {'random':>7} {'recent':>7} {'random':>7} {'recent':>7} {'LOO':>8}"
    )
    print(head)
    print(sub)
    for name, row in summary.items():
        print(
            f"{name:<20} {row['mean_score_drop']:>8.3f} {row['median_score_drop']:>8.3f}"
            f" {row['mean_rank_drop']:>6.1f} {row['median_rank_drop']:>6g}"
            f" {row[f'out_of_top_{TOP_N}']:>7.1%}"
            f" {cell(row, 'score_drop_gt_random'):>7} {cell(row, 'score_drop_gt_recent'):>7}"
            f" {cell(row, 'rank_drop_gt_random'):>7} {cell(row, 'rank_drop_gt_recent'):>7}"
            f" {row['same_event_as_leave_one_out']:>8.1%}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="bundle directory")
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--batch-users",
        type=int,
        default=1,
        help="users per rebuild call (one user's call already holds window + 1 rows; more "
        "users add padding where their windows differ in length)",
    )
    default_workdir = Path(tempfile.gettempdir()) / "interest-bench-stream"  # bench/stream.py's
    ap.add_argument("--workdir", type=Path, default=default_workdir)
    args = ap.parse_args()
    if not DATA.is_file():
        print(f"skipped: {DATA} not found (the data sets are not committed)")
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = find_bundle(args.workdir, args.model)
    rt = EncoderRuntime.load(bundle, device="cpu")

    t0 = time.monotonic()
    histories = training_histories(rt, load_histories(DATA), args.users, args.seed)
    memories = long_term_memories(rt, histories, chunk=64)
    cases = [UserCase(h[-args.window :], m) for h, m in zip(histories, memories, strict=True)]
    t1 = time.monotonic()
    rng = np.random.default_rng([args.seed, 1])  # the random strategy's own draws
    emb = rt.item_embeddings.astype(np.float64)
    results: list[dict[str, Removal]] = []
    for start in range(0, len(cases), args.batch_users):
        batch = cases[start : start + args.batch_users]
        done, weights_of = run_batch(rt, emb, batch, rng)
        if start == 0:
            check_against_leave_one_out(rt, batch[0], *weights_of[0])
        results += done
    t2 = time.monotonic()

    summary = summarize(results)
    lengths = [len(c.window) for c in cases]
    print(
        f"bundle {bundle} (version {rt.version}), {len(cases)} users, seed {args.seed}, window"
        f" <= {args.window} (mean {statistics.fmean(lengths):.0f} events), memory after the"
        " whole training history"
    )
    print_table(summary)
    print()
    pairs = head_to_head(results)
    print_head_to_head(pairs)
    same = summary["similarity baseline"]["same_event_as_leave_one_out"]
    print(f"leave-one-out's top event is the baseline's in {same:.1%} of users")
    print(f"time: data and memories {t1 - t0:.1f} s, explanations {t2 - t1:.1f} s")
    record = {
        "users": len(cases),
        "window": args.window,
        "mean_window": round(statistics.fmean(lengths), 1),
        "seed": args.seed,
        "bundle_version": rt.version,
        "loo_top_equals_baseline": same,
        "seconds": round(t2 - t0, 1),
        "strategies": summary,
        "head_to_head": pairs,
    }
    print("SUMMARY " + json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
