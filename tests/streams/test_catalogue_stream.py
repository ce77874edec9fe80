"""New items from the catalogue in a real worker: an item only the catalogue file has becomes
rankable once the file is written, with the user's vector dotted with its projected content as
its score, and a rewrite of the file while the worker runs takes effect without a restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the training extra (pip install -e .[train])")

from export.runtime import EncoderRuntime
from streams.client import InterestClient
from streams.settings import Settings
from tests.conftest import WorkerProcess, read_json, wait_for
from tests.streams.test_catalogue import CONTENT_DIM, bundle_with_map, write_vectors
from tests.streams.test_encoder_stream import ITEMS, N_ITEMS, stored_vectors

EVERY_ITEM = N_ITEMS + 2  # top-k long enough to hold every item: a rankable one is listed


class Stream:
    """One user's events pushed one at a time, and the recommendation each one got."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sent = 0

    def push(self, item: str) -> dict[str, Any]:
        event_id = f"e{self.sent}"
        event = {
            "event_id": event_id,
            "user_id": "u1",
            "item_id": item,
            "event_type": "click",
            "timestamp": 1_767_225_600_000 + self.sent * 1000,
        }
        with InterestClient(self.settings) as client:
            client.push([event])
        self.sent += 1
        recs = read_json(self.settings, self.settings.topic_recommendations, self.sent, 60)
        (rec,) = [r for r in recs if r["trigger_event_id"] == event_id]
        return rec

    def until(self, condition: Callable[[list[str]], bool], what: str) -> dict[str, Any]:
        """Push known items until a recommendation meets ``condition`` (the file is read in
        the background, and swapped in between batches)."""
        found: list[dict[str, Any]] = []

        def met() -> bool:
            rec = self.push(ITEMS[2 + self.sent % 20])
            found.append(rec)
            return condition([item["item_id"] for item in rec["items"]])

        wait_for(met, 60, what, interval=0.5)
        return found[-1]


def test_catalogue_items_become_rankable_and_follow_the_file(
    settings: Settings, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    bundle = bundle_with_map(tmp_path)
    catalogue = tmp_path / "catalogue.npz"  # not there yet when the worker starts
    worker = start_worker(
        INTEREST_MODEL=str(bundle),
        INTEREST_CATALOGUE=str(catalogue),
        INTEREST_MODEL_POLL_SECONDS="0.2",
        INTEREST_TOP_K=str(EVERY_ITEM),
    )
    stream = Stream(settings.model_copy(update={"top_k": EVERY_ITEM}))
    first = stream.push(ITEMS[1])
    assert first["source"] == "encoder"
    assert {item["item_id"] for item in first["items"]} == set(ITEMS) - {ITEMS[1]}

    write_vectors(catalogue, [ITEMS[0], "new-a"])  # ITEMS[0] the model knows already
    rec = stream.until(lambda items: "new-a" in items, "new-a in a recommendation")
    rt = EncoderRuntime.load(bundle, device="cpu")
    content = np.random.default_rng(2).normal(size=(2, CONTENT_DIM)).astype(np.float32)
    vector, _ = stored_vectors(settings)["u1"]  # after the user's last event, that rec's
    score = {item["item_id"]: item["score"] for item in rec["items"]}["new-a"]
    assert score == pytest.approx(float(vector @ rt.project(content[1:])[0]), rel=1e-4, abs=1e-4)

    write_vectors(catalogue, ["new-b"], seed=7)  # rewritten while the worker runs
    stream.until(lambda items: "new-b" in items and "new-a" not in items, "the rewritten file")

    # An event on the new item: the model cannot read it (the vector stays), and the item is
    # not recommended to the user again.
    before, _ = stored_vectors(settings)["u1"]
    on_new = stream.push("new-b")
    after, _ = stored_vectors(settings)["u1"]
    np.testing.assert_array_equal(before, after)
    assert "new-b" not in {item["item_id"] for item in on_new["items"]}
    assert "new-b" not in {item["item_id"] for item in stream.push(ITEMS[5])["items"]}
    assert "catalogue" in worker.log() and "Traceback" not in worker.log()
