"""The popularity penalty and the popularity-bias metrics in a real worker.

INTEREST_POPULARITY_PENALTY must re-rank the stream exactly as `interest evaluate` re-ranks
offline (the bundle's item counts through encoder/popularity.py), and the worker's exposure
metrics must count what it actually published.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the training extra (pip install -e .[train])")

from encoder.data import load_interactions  # noqa: E402
from encoder.model import InterestEncoder  # noqa: E402
from encoder.popularity import long_tail, popularity_bias  # noqa: E402
from export.bundle import export_bundle, save_model_dir  # noqa: E402
from export.runtime import top_k_reference  # noqa: E402
from streams.client import InterestClient  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.stack import free_port  # noqa: E402
from tests.conftest import WorkerProcess, read_json, wait_for  # noqa: E402
from tests.export.conftest import tiny_model  # noqa: E402
from tests.streams.test_encoder_stream import ITEMS, N_ITEMS, single_topic_events  # noqa: E402
from tests.streams.test_health import get  # noqa: E402

# Skewed training counts: item-0 is the most popular; the head is the first ceil(0.2 * 30).
COUNTS = [1000 // (i + 1) for i in range(N_ITEMS)]
PENALTY = 1.0


def _bundle(tmp: Path) -> tuple[InterestEncoder, Path]:
    model = tiny_model(n_items=N_ITEMS, seed=3)
    model_dir = save_model_dir(model, ITEMS, tmp / "model", counts=COUNTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, export_bundle(model_dir=model_dir, out=tmp / "bundle")


def _offline_top(
    model: InterestEncoder, events: list[dict[str, Any]], tmp: Path, k: int, penalty: float
) -> dict[str, list[str]]:
    """Per event: the torch model's top-k after it, re-ranked by the penalty, the user's
    items so far excluded (what the worker must publish)."""
    path = tmp / "log.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    inter = load_interactions(path, item_ids=ITEMS, n_time_buckets=model.cfg.n_time_buckets)
    bias = popularity_bias(np.array([0, *COUNTS]), penalty)
    per_user = {u: [e for e in events if e["user_id"] == u] for u in inter.user_ids}
    out = {}
    with torch.no_grad():
        for user, seq in zip(inter.user_ids, inter.sequences, strict=True):
            hidden = model(*(torch.from_numpy(x)[None] for x in (seq.items, seq.types, seq.gaps)))
            scores = model.item_scores(hidden[0]).numpy() + bias  # (T, n_items + 1)
            for t, event in enumerate(per_user[user]):
                seen = [np.unique(seq.items[: t + 1]).tolist()]
                top, _ = top_k_reference(scores[t : t + 1], k, seen)
                out[event["event_id"]] = [ITEMS[i - 1] for i in top[0].tolist()]
    return out


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_the_penalty_reranks_as_offline_and_the_metrics_count_what_was_sent(
    settings: Settings, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    model, bundle = _bundle(tmp_path)
    port = free_port()
    start_worker(
        INTEREST_MODEL=str(bundle),
        INTEREST_POPULARITY_PENALTY=str(PENALTY),
        INTEREST_METRICS_PORT=str(port),
    )
    events = single_topic_events(users=5, per_user=8)
    with InterestClient(settings) as client:
        client.push(events)
    recs = read_json(settings, settings.topic_recommendations, len(events), timeout=60)
    expected = _offline_top(model, events, tmp_path, settings.top_k, PENALTY)
    unpenalised = _offline_top(model, events, tmp_path, settings.top_k, 0.0)
    assert expected != unpenalised, "the penalty must change some lists for this test to bite"
    assert {r["trigger_event_id"] for r in recs} == set(expected)
    for rec in recs:
        assert rec["source"] == "encoder"
        items = [item["item_id"] for item in rec["items"]]
        assert items == expected[rec["trigger_event_id"]], rec["trigger_event_id"]

    # What was published, measured by hand against the bundle's long tail.
    tail = long_tail(np.array([0, *COUNTS]))
    slots = [ITEMS.index(item["item_id"]) + 1 for rec in recs for item in rec["items"]]
    tail_slots = int(tail[slots].sum())
    version = json.loads((bundle / "manifest.json").read_text())["version"]
    wanted = {
        'interest_recommended_items_total{segment="long_tail"}': tail_slots,
        'interest_recommended_items_total{segment="head"}': len(slots) - tail_slots,
        f'interest_recommendation_long_tail_share{{model_version="{version}"}}': tail_slots
        / len(slots),
        f'interest_recommendation_coverage{{model_version="{version}"}}': len(set(slots)) / N_ITEMS,
    }

    def counted() -> bool:
        text = get(port, "/metrics")[1].decode()
        return _metric(text, 'interest_recommended_items_total{segment="head"}') + _metric(
            text, 'interest_recommended_items_total{segment="long_tail"}'
        ) == len(slots)

    wait_for(counted, 30, "the last batch's metrics")
    text = get(port, "/metrics")[1].decode()
    for name, value in wanted.items():
        assert _metric(text, name) == pytest.approx(value), name
