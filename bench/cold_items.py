"""Cold items on ml-1m: can items nobody interacted with be recommended from their content?

    python bench/cold_items.py                      # two trainings, then the evaluation
    python bench/cold_items.py --workdir W --reuse  # evaluate again with the models in W

1. Hold out a random share of the items entirely (``--share``, 10%): every interaction with
   them leaves the training log.
2. Train the encoder on the rest (model "known"), and one on everything (model "all"), the
   same epochs each (``--epochs``): equal schedules whatever the machine's load.
3. Embed every item's title and genres with the sentence model, fit the content map on the
   known items' trained embeddings (encoder/content_map.py), timed.
4. Cold ranking: for every interaction (user, held-out item), the user's vector after its
   known events before it (held-out items are not input: the model cannot read them) ranks
   all held-out items but those the user met before. Systems: the content map; popularity;
   random; a nearest-neighbours map as a second content method. Plain popularity cannot rank
   items without training events (all zero), so "genre popularity" scores a held-out item by
   the mean training count of the known items of each of its genres: what is known at launch.
   "oracle popularity" counts the held-out interactions themselves: it sees the future, a
   ceiling for popularity, not a baseline. Ties are broken at random. Cases with no known
   event before them have no user vector and are left out (counted).
5. The same cases ranked among all items (known items by their trained embeddings, held-out
   ones projected, with and without the map's length scale), beside model "all", which
   trained on these very interactions (a warm ceiling, not a baseline), and the share of
   top-10 slots that held-out items take; and what the new items cost the known ones: model
   "known"'s leave-one-out on the known items ranked among the known items alone and among
   the known and the new.
6. Accuracy on the known items: leave-one-out, the known items ranked, for the users whose
   last event is a known item (otherwise model "all" trained on the test target): model
   "known", and model "all" fed the same known-only history and fed its whole history.

Intervals: 95% percentile bootstrap, over cases for 4-5 (as the issue asks; one user's cases
are not independent, so these are somewhat narrow) and over users for 6, plus the paired
difference where two systems share the cases.

Data: ml-1m.txt, ml-1m_movies.dat and ml-1m_sas_to_original_items.txt in ../shared/data (never
committed); where they are missing the bench says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA_DIR = ROOT.parent / "shared" / "data"
K = 10
TOKENS_PER_BATCH = 2_000_000  # bounds the (B, T, T) attention masks of the forward passes


@dataclass(frozen=True)
class Split:
    users: list[str]
    sequences: list[list[str]]  # each user's items in time order, the log's ids
    held_out: set[str]


def read_log(path: Path) -> tuple[list[str], list[list[str]]]:
    users: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            user, item = line.split()
            users.setdefault(user, []).append(item)
    return list(users), list(users.values())


def make_split(path: Path, share: float, seed: int) -> Split:
    users, sequences = read_log(path)
    items = sorted({item for seq in sequences for item in seq}, key=int)
    rng = np.random.default_rng(seed)
    held = rng.choice(len(items), size=round(share * len(items)), replace=False)
    return Split(users, sequences, {items[i] for i in held})


def write_known_log(split: Split, out: Path) -> Path:
    with out.open("w") as f:
        for user, seq in zip(split.users, split.sequences, strict=True):
            f.writelines(f"{user} {item}\n" for item in seq if item not in split.held_out)
    return out


def genres_by_item(movies: Path, item_map: Path) -> dict[str, list[str]]:
    from encoder.catalogue import read_item_map

    to_log = read_item_map(item_map)
    out = {}
    for line in movies.read_bytes().decode("latin-1").splitlines():
        movie, _, genres = line.split("::")
        if movie in to_log:
            out[to_log[movie]] = genres.split("|")
    return out


# ----------------------------------------------------------------------------- training


def train_model(data: Path, out: Path, args: argparse.Namespace) -> dict:
    from encoder.train import train

    if args.reuse and (out / "model.pt").is_file():
        return json.loads((out / "metrics.json").read_text())
    return train(
        data, out, epochs=args.epochs, max_minutes=args.max_minutes, progress=False, seed=args.seed
    )


# ----------------------------------------------------------------------------- vectors


def vectors_at(model, sequences: list[np.ndarray], wanted: list[np.ndarray]) -> list[np.ndarray]:
    """Per user, the model's vector after each position in ``wanted[u]`` of its whole
    sequence (model indices), from one forward pass over it (exact: the attention is a
    sliding window and the memory a scan, so the whole history at once is what the stream
    computes step by step)."""
    import torch

    order = sorted(range(len(sequences)), key=lambda u: len(sequences[u]))
    out: list[np.ndarray] = [np.zeros((0, model.cfg.d_model), np.float32)] * len(sequences)
    start = 0
    with torch.no_grad():
        while start < len(order):
            width = max(1, len(sequences[order[start]]))
            stop = start + 1
            while stop < len(order):
                wider = max(width, len(sequences[order[stop]]))
                if (stop - start + 1) * wider * wider > TOKENS_PER_BATCH:
                    break
                width, stop = wider, stop + 1
            rows = [u for u in order[start:stop] if len(wanted[u])]
            start = stop
            if not rows:
                continue
            items = np.zeros((len(rows), width), np.int64)
            for r, u in enumerate(rows):
                items[r, width - len(sequences[u]) :] = sequences[u]
            zeros = torch.zeros_like(torch.from_numpy(items))
            h = model(torch.from_numpy(items), zeros, zeros).numpy()
            for r, u in enumerate(rows):
                out[u] = h[r, width - len(sequences[u]) + wanted[u]]
    return out


# ----------------------------------------------------------------------------- ranking


def ranks_with_random_ties(
    scores: np.ndarray, target: np.ndarray, excluded: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """0-based rank of column ``target[i]`` in row i of ``scores`` among the columns not
    ``excluded`` (bool, same shape); ties placed at random."""
    scores = np.where(excluded, -np.inf, scores)
    own = scores[np.arange(len(scores)), target][:, None]
    greater = (scores > own).sum(axis=1)
    ties = (scores == own).sum(axis=1) - 1
    return greater + np.floor(rng.random(len(scores)) * (ties + 1)).astype(np.int64)


def interval(values: np.ndarray, resamples: int) -> list[float]:
    from encoder.metrics import bootstrap_interval

    low, high = bootstrap_interval(values, resamples=resamples)
    return [round(float(np.mean(values)), 4), round(low, 4), round(high, 4)]


def summary(ranks: np.ndarray, resamples: int) -> dict[str, list[float]]:
    from encoder.metrics import gains, hits

    return {
        "ndcg@10": interval(gains(ranks, K), resamples),
        "hr@10": interval(hits(ranks, K), resamples),
    }


def paired(a: np.ndarray, b: np.ndarray, resamples: int) -> dict[str, list[float]]:
    """Mean difference a - b per case or user, with its interval."""
    from encoder.metrics import gains, hits

    return {
        "ndcg@10": interval(gains(a, K) - gains(b, K), resamples),
        "hr@10": interval(hits(a, K) - hits(b, K), resamples),
    }


@dataclass(frozen=True)
class Cases:
    """One row per (user, held-out item) interaction that has a known event before it."""

    user: np.ndarray  # (C,) user row
    target: np.ndarray  # (C,) column of the item among the held-out items
    vector: np.ndarray  # (C, d) model "known"'s vector before the interaction
    seen_cold: np.ndarray  # (C, H) bool: held-out items the user met before
    position: np.ndarray  # (C,) position of the interaction in the user's full sequence
    skipped: int  # interactions with no known event before them


def cold_cases(split: Split, model, vocab: dict[str, int], cold: list[str]) -> Cases:
    column = {item: c for c, item in enumerate(cold)}
    known_seqs, wanted, meta = [], [], []
    skipped = 0
    for u, seq in enumerate(split.sequences):
        known = [vocab[i] for i in seq if i not in split.held_out]
        known_seqs.append(np.array(known, np.int64))
        before = np.cumsum([i not in split.held_out for i in seq])  # known events up to t
        want = []
        for t, item in enumerate(seq):
            if item in split.held_out:
                k = int(before[t])  # the held-out item itself adds nothing
                if k == 0:
                    skipped += 1
                    continue
                want.append(k - 1)
                meta.append((u, column[item], t))
        wanted.append(np.array(want, np.int64))
    vectors = np.concatenate(vectors_at(model, known_seqs, wanted))
    user = np.array([m[0] for m in meta], np.int64)
    target = np.array([m[1] for m in meta], np.int64)
    position = np.array([m[2] for m in meta], np.int64)
    seen = np.zeros((len(meta), len(cold)), bool)
    for row, (u, _, t) in enumerate(meta):
        earlier = [column[i] for i in split.sequences[u][:t] if i in split.held_out]
        seen[row, earlier] = True
    return Cases(user, target, vectors, seen, position, skipped)


def knn_map(content_known: np.ndarray, emb_known: np.ndarray, content_cold: np.ndarray, k: int):
    """Each cold item's embedding as the mean of its k nearest known items' (cosine)."""
    nearest = np.argsort(-(content_cold @ content_known.T), axis=1)[:, :k]
    return emb_known[nearest].mean(axis=1)


def cold_table(
    cases: Cases,
    scores_by_system: dict[str, np.ndarray],
    rng: np.random.Generator,
    resamples: int,
) -> tuple[dict, dict[str, np.ndarray]]:
    ranks = {}
    for name, scores in scores_by_system.items():
        full = scores if scores.ndim == 2 else np.broadcast_to(scores, cases.seen_cold.shape)
        ranks[name] = ranks_with_random_ties(full, cases.target, cases.seen_cold, rng)
    return {name: summary(r, resamples) for name, r in ranks.items()}, ranks


def mixed_ranks(
    split: Split,
    cases: Cases,
    table: np.ndarray,
    vocab: dict[str, int],
    cold: list[str],
    vectors: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float]:
    """Each case's held-out item ranked among every item of ``table`` (row 0 padding, known
    items by ``vocab``, then, past ``len(vocab)``, the held-out ones in ``cold`` order unless
    ``vocab`` holds them), the user's earlier items excluded; and the share of top-10 slots
    that held-out items took."""
    index = dict(vocab)
    for c, item in enumerate(cold):
        index.setdefault(item, len(vocab) + 1 + c)
    cold_index = np.array([index[i] for i in cold], np.int64)
    ranks = np.zeros(len(cases.user), np.int64)
    cold_slots = 0
    for start in range(0, len(ranks), 2048):
        rows = np.arange(start, min(start + 2048, len(ranks)))
        scores = vectors[rows] @ table.T
        excluded = np.zeros(scores.shape, bool)
        excluded[:, 0] = True
        for r, row in enumerate(rows):
            seq = split.sequences[cases.user[row]][: cases.position[row]]
            excluded[r, [index[i] for i in seq]] = True
        target = cold_index[cases.target[rows]]
        ranks[rows] = ranks_with_random_ties(scores, target, excluded, rng)
        masked = np.where(excluded, -np.inf, scores)
        top = np.argpartition(-masked, K, axis=1)[:, :K]
        cold_slots += int(np.isin(top, cold_index).sum())
    return ranks, cold_slots / (K * len(ranks))


# ----------------------------------------------------------------------------- known items


def loo_ranks(model_dir: Path, log: Path, held_out: set[str]) -> dict[str, int]:
    """Per user, the rank of its last event of ``log`` among the known items (a model that
    knows the held-out items too ranks without them, as one that does not)."""
    from encoder.evaluate import prepare, rankings

    ev = prepare(model_dir, log)
    vocab = [None, *ev.inter.item_ids]
    bias = np.array([-np.inf if i in held_out else 0.0 for i in vocab], np.float32)
    bias[0] = 0.0
    (ranking,) = rankings(ev.model, ev.inter, ev.batch, ev.split, [bias])
    users = [ev.inter.user_ids[u] for u in ev.batch.users.tolist()]
    return dict(zip(users, ranking.ranks.tolist(), strict=True))


def known_among_new(
    split: Split,
    known_log: Path,
    workdir: Path,
    cold: list[str],
    projected: np.ndarray,
    resamples: int,
) -> dict:
    """What the new items cost the known ones: model "known"'s leave-one-out on the known
    items, ranked among the known items alone and among the known and the held-out ones
    (projected), the held-out items the user met before its target excluded; users whose
    last event is a known item."""
    import torch

    from encoder.evaluate import prepare

    ev = prepare(workdir / "known", known_log)
    table = ev.model.item_embeddings().detach().numpy()
    full = dict(zip(split.users, split.sequences, strict=True))
    column = {item: c for c, item in enumerate(cold)}
    alone, among = [], []
    with torch.no_grad():
        for start in range(0, len(ev.batch), 512):
            b = ev.batch.select(torch.arange(start, min(start + 512, len(ev.batch))))
            width = max(int(b.lengths().max()), 1)
            vectors = ev.model.last_vectors(
                b.items[:, -width:],
                b.types[:, -width:],
                b.gaps[:, -width:],
                ev.model.memory_from_prefix(b.prefix),
            ).numpy()
            for row, u in enumerate(b.users.tolist()):
                seq = full[ev.inter.user_ids[u]]
                if seq[-1] in split.held_out:
                    continue
                known = ev.inter.sequences[u].items
                scores = vectors[row] @ table.T
                scores[0] = -np.inf
                target = scores[known[-1]]
                scores[known[:-1]] = -np.inf
                met = [column[i] for i in seq[:-1] if i in column]
                cold_scores = vectors[row] @ projected.T
                cold_scores[met] = -np.inf
                alone.append(int((scores > target).sum()))
                among.append(alone[-1] + int((cold_scores > target).sum()))
    alone_ranks, among_ranks = np.array(alone), np.array(among)
    return {
        "users": len(alone),
        "known items only": summary(alone_ranks, resamples),
        "known and new items": summary(among_ranks, resamples),
        "difference": paired(among_ranks, alone_ranks, resamples),
    }


def known_accuracy(
    split: Split, data: Path, known_log: Path, workdir: Path, resamples: int
) -> dict:
    """Leave-one-out on the known items for the users whose last event is one: the target is
    then the same event for both models, and one model "all" never trained on. Model "all"
    fed the same known-only history as model "known", and fed its whole history (what it
    would read in the stream)."""
    last_known = {
        user
        for user, seq in zip(split.users, split.sequences, strict=True)
        if seq[-1] not in split.held_out
    }
    runs = {
        "known": (workdir / "known", known_log),
        "all, known history": (workdir / "all", known_log),
        "all, whole history": (workdir / "all", data),
    }
    ranks = {
        name: loo_ranks(model_dir, log, split.held_out) for name, (model_dir, log) in runs.items()
    }
    users = sorted(set.intersection(*(set(r) for r in ranks.values())) & last_known)
    arrays = {name: np.array([r[u] for u in users]) for name, r in ranks.items()}
    out: dict = {"users": len(users)}
    out.update({name: summary(a, resamples) for name, a in arrays.items()})
    for other in ("all, known history", "all, whole history"):
        out[f"known - ({other})"] = paired(arrays["known"], arrays[other], resamples)
    return out


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    import torch

    from encoder.catalogue import read_catalogue
    from encoder.content import SENTENCE_MODEL, embed_texts, load_sentence_model
    from encoder.content_map import fit_content_map
    from encoder.evaluate import load_model

    args.workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    split = make_split(args.data, args.share, args.seed)
    known_log = write_known_log(split, args.workdir / "known.txt")
    cold = sorted(split.held_out, key=int)

    costs = {}
    t = time.perf_counter()
    catalogue = read_catalogue(args.movies, args.item_map)
    sentence_model = load_sentence_model()
    costs["sentence_model_load_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    content = dict(
        zip(catalogue.item_ids, embed_texts(catalogue.texts, sentence_model), strict=True)
    )
    costs["embed_s"] = round(time.perf_counter() - t, 2)
    costs["items_embedded"] = len(catalogue)

    trained = {}
    for name, data in (("known", known_log), ("all", args.data)):
        t = time.perf_counter()
        info = train_model(data, args.workdir / name, args)
        trained[name] = {
            "epochs": info["epochs"],
            "train_minutes": info["train_minutes"],
            "wall_minutes": round((time.perf_counter() - t) / 60, 2),
        }

    model, known_items = load_model(args.workdir / "known")
    vocab = {item: i + 1 for i, item in enumerate(known_items)}
    table = model.item_embeddings().detach().numpy()
    t = time.perf_counter()
    content_map = fit_content_map(
        np.stack([content[i] for i in known_items]), table[1:], SENTENCE_MODEL, seed=args.seed
    )
    costs["fit_s"] = round(time.perf_counter() - t, 3)
    costs["fit_alpha"] = content_map.alpha
    costs["fit_cv_r2"] = round(content_map.cv_r2, 4)
    costs["fit_scale"] = round(content_map.scale, 4)
    content_cold = np.stack([content[i] for i in cold])
    projected = content_map.project(content_cold)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cases = cold_cases(split, model, vocab, cold)
    counts = np.array(
        json.loads((args.workdir / "known" / "vocab.json").read_text())["item_counts"]
    )
    genres = genres_by_item(args.movies, args.item_map)
    genre_counts: dict[str, list[int]] = {}
    for item, count in zip(known_items, counts, strict=True):
        for g in genres[item]:
            genre_counts.setdefault(g, []).append(int(count))
    genre_mean = {g: float(np.mean(c)) for g, c in genre_counts.items()}
    oracle = np.bincount(cases.target, minlength=len(cold)).astype(np.float64)
    content_known = np.stack([content[i] for i in known_items])
    systems = {
        "content map": cases.vector @ projected.T,
        "content kNN (20)": cases.vector @ knn_map(content_known, table[1:], content_cold, 20).T,
        "genre popularity": np.array(
            [np.mean([genre_mean.get(g, 0.0) for g in genres[i]]) for i in cold]
        ),
        "random": rng.random((len(cases.user), len(cold))),
        "oracle popularity (sees the held-out interactions)": oracle,
    }
    cold_result, cold_ranks = cold_table(cases, systems, rng, args.resamples)
    cold_result["content map - genre popularity"] = paired(
        cold_ranks["content map"], cold_ranks["genre popularity"], args.resamples
    )

    mixed = {}
    full_table = np.vstack([table, projected])
    ranks, share = mixed_ranks(split, cases, full_table, vocab, cold, cases.vector, rng)
    mixed["content map (model known)"] = {
        **summary(ranks, args.resamples),
        "cold_slot_share": share,
    }
    unscaled = projected / content_map.scale
    ranks, share = mixed_ranks(
        split, cases, np.vstack([table, unscaled]), vocab, cold, cases.vector, rng
    )
    mixed["content map without its length scale"] = {
        **summary(ranks, args.resamples),
        "cold_slot_share": share,
    }
    model_all, all_items = load_model(args.workdir / "all")
    all_vocab = {item: i + 1 for i, item in enumerate(all_items)}
    all_seqs = [np.array([all_vocab[i] for i in seq], np.int64) for seq in split.sequences]
    wanted = [cases.position[cases.user == u] - 1 for u in range(len(split.sequences))]
    per_user = vectors_at(model_all, all_seqs, wanted)
    order = np.argsort(cases.user, kind="stable")  # vectors_at returns each user's in order
    all_vectors = np.zeros_like(cases.vector[:, : model_all.cfg.d_model])
    all_vectors[order] = np.concatenate(per_user)
    all_table = model_all.item_embeddings().detach().numpy()
    ranks, share = mixed_ranks(split, cases, all_table, all_vocab, cold, all_vectors, rng)
    mixed["model all (trained on these interactions)"] = {
        **summary(ranks, args.resamples),
        "cold_slot_share": share,
    }
    return {
        "held_out_items": len(cold),
        "cases": len(cases.user),
        "skipped_cases": cases.skipped,
        "cases_users": len(set(cases.user.tolist())),
        "training": trained,
        "content_cost": costs,
        "cold_ranking": cold_result,
        "among_all_items": mixed,
        "known_items_among_new": known_among_new(
            split, known_log, args.workdir, cold, projected, args.resamples
        ),
        "known_items": known_accuracy(split, args.data, known_log, args.workdir, args.resamples),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA_DIR / "ml-1m.txt")
    ap.add_argument("--movies", type=Path, default=DATA_DIR / "ml-1m_movies.dat")
    ap.add_argument("--item-map", type=Path, default=DATA_DIR / "ml-1m_sas_to_original_items.txt")
    ap.add_argument("--share", type=float, default=0.1, help="items held out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6, help="epochs of each training")
    ap.add_argument("--max-minutes", type=float, default=20.0, help="safety cap per training")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cold-items"))
    ap.add_argument("--reuse", action="store_true", help="keep models already in --workdir")
    args = ap.parse_args()
    for path in (args.data, args.movies, args.item_map):
        if not path.is_file():
            print(f"skipped: {path} not found")
            return 0
    result = run(args)
    print(json.dumps(result, indent=2))
    (args.workdir / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
