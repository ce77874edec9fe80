"""How much a trained encoder memorises: NDCG@10 on targets it trained on vs held-out ones.

    python bench/fit_gap.py --model DIR --data ../shared/data/ml-1m.txt

Prints full-ranking NDCG@10 (seen items excluded) for each user's 6th- and 4th-to-last events
(training targets), the 2nd-to-last (validation) and the last (test). Each is ranked from the
events before it, as `interest evaluate` ranks the test event; users with too few events for a
row (3 before dropping) are left out of it, so on short-history logs the rows cover fewer users.
A large train-minus-validation
gap says regularisation (weight decay, dropout) may help more than capacity.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="directory from `interest train`")
    ap.add_argument("--data", type=Path, required=True, help="the log it was trained on")
    args = ap.parse_args()

    from common.errors import UserError
    from encoder.data import (
        Interactions,
        UserSequence,
        eval_batch,
        load_interactions,
        memory_horizon,
    )
    from encoder.evaluate import load_model, rank_split

    try:
        model, item_ids = load_model(args.model)
        cfg = model.cfg
        inter = load_interactions(args.data, item_ids=item_ids, n_time_buckets=cfg.n_time_buckets)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    prefix = memory_horizon(cfg.memory_decay) if cfg.use_memory else 0

    def ndcg_at(dropped: int, split: str) -> float:
        """NDCG@10 of the `split` target after dropping each user's last `dropped` events."""
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

    print(
        json.dumps(
            {
                "train (6th to last)": ndcg_at(4, "valid"),
                "train (4th to last)": ndcg_at(2, "valid"),
                "validation": ndcg_at(0, "valid"),
                "test": ndcg_at(0, "test"),
            }
        )
    )


if __name__ == "__main__":
    main()
