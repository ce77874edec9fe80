"""Explanations in the stream (INTEREST_EXPLAIN) against the offline torch model: the worker's
`because` for each recommended item names the events, with the weights, that the model's own
leave-one-out over the user's history gives offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the training extra (pip install -e .[train])")

from encoder.explain import leave_one_out
from encoder.features import event_type_index
from streams.client import InterestClient
from streams.settings import Settings
from tests.conftest import WorkerProcess, read_json
from tests.streams.test_encoder_stream import ITEMS, make_bundle, single_topic_events

TOP = 3


def test_streamed_explanations_match_the_offline_model(
    settings: Settings, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    model, bundle = make_bundle(tmp_path, seed=2)
    events = single_topic_events(users=3, per_user=8)
    start_worker(
        INTEREST_MODEL=str(bundle),
        INTEREST_EXPLAIN="true",
        INTEREST_EXPLAIN_EVENTS=str(TOP),
        INTEREST_WINDOW_LENGTH="50",  # the whole history: offline needs no persisted memory
    )
    with InterestClient(settings) as client:
        client.push(events)
    recs = read_json(settings, settings.topic_recommendations, len(events), timeout=60)
    assert len(recs) == len(events)
    by_trigger = {r["trigger_event_id"]: r for r in recs}
    checked = 0
    for user in {e["user_id"] for e in events}:
        history = sorted((e for e in events if e["user_id"] == user), key=lambda e: e["timestamp"])
        rec = by_trigger[history[-1]["event_id"]]
        assert rec["source"] == "encoder"
        targets = np.array([ITEMS.index(i["item_id"]) + 1 for i in rec["items"]])
        _, weights = leave_one_out(
            model,
            np.array([ITEMS.index(e["item_id"]) + 1 for e in history]),
            np.array([event_type_index(e["event_type"]) for e in history]),
            np.array([e["timestamp"] for e in history]),
            None,
            targets,
            use_gaps=model.cfg.uses_time_gaps,
        )
        for item, row in zip(rec["items"], weights, strict=True):
            order = [j for j in np.argsort(-row, kind="stable")[:TOP] if row[j] > 0]
            expected = [(history[j]["event_id"], float(row[j])) for j in order]
            got = [(b["event_id"], b["weight"]) for b in item["because"]]
            assert [e for e, _ in got] == [e for e, _ in expected], (user, item["item_id"])
            np.testing.assert_allclose([w for _, w in got], [w for _, w in expected], atol=1e-4)
            assert all(b["item_id"] in ITEMS for b in item["because"])
            checked += 1
    assert checked == 3 * len(rec["items"])
