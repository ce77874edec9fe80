"""Catalogue items in the encoder recommender, without broker or Redis: the extended item
table, its scores against a plain reference, the file followed as it changes, and the items a
user met excluded. Content vectors are made up here (the sentence model is tested once, in
tests/interest/test_catalogue_cli.py)."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the training extra (pip install -e .[train])")

from common.errors import UserError
from encoder.catalogue_vectors import CatalogueVectors, save_catalogue_vectors
from encoder.content_map import ContentMap, save_content_map
from encoder.popularity import popularity_bias
from export.bundle import export_bundle, save_model_dir
from export.runtime import EncoderRuntime, top_k_reference
from streams.catalogue import CatalogueWatch, catalogue_items, model_items
from streams.encoder_recommender import EncoderRecommender
from streams.window import WindowEntry
from tests.export.conftest import tiny_model
from tests.streams.test_encoder_recommender import one_event_batch
from tests.streams.test_encoder_stream import ITEMS, N_ITEMS

CONTENT_DIM = 6
ENCODER = "test-sentence-model"
COUNTS = [1000 // (i + 1) for i in range(N_ITEMS)]


def bundle_with_map(tmp: Path, content_map: bool = True) -> Path:
    model = tiny_model(n_items=N_ITEMS, seed=4)
    model_dir = save_model_dir(model, ITEMS, tmp / "model", counts=COUNTS)
    if content_map:
        weights = np.random.default_rng(1).normal(size=(CONTENT_DIM + 1, model.cfg.d_model))
        save_content_map(model_dir, ContentMap(weights.astype(np.float32), ENCODER, 1.0, 30, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_bundle(model_dir=model_dir, out=tmp / "bundle")


def write_vectors(path: Path, item_ids: list[str], seed: int = 2, encoder: str = ENCODER) -> None:
    vectors = np.random.default_rng(seed).normal(size=(len(item_ids), CONTENT_DIM))
    save_catalogue_vectors(path, CatalogueVectors(item_ids, vectors.astype(np.float32), encoder))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bundle_with_map(tmp_path_factory.mktemp("catalogue"))


@pytest.mark.parametrize("penalty", [0.0, 1.0])
def test_new_items_rank_after_the_model_items_by_their_projected_content(
    bundle: Path, tmp_path: Path, penalty: float
) -> None:
    rt = EncoderRuntime.load(bundle, device="cpu", popularity_penalty=penalty)
    path = tmp_path / "catalogue.npz"
    write_vectors(path, [ITEMS[0], "new-a", "new-b"])  # ITEMS[0] keeps its trained embedding
    table = catalogue_items(rt, path)
    assert table.names.tolist() == [None, *ITEMS, "new-a", "new-b"]
    assert dict(table.extra) == {"new-a": N_ITEMS + 1, "new-b": N_ITEMS + 2}
    assert table.extra_index_of(["new-b", ITEMS[0], "x"]).tolist() == [N_ITEMS + 2, 0, 0]
    content = np.random.default_rng(2).normal(size=(3, CONTENT_DIM)).astype(np.float32)
    projected = content[1:] @ rt.content_map[:-1] + rt.content_map[-1]
    np.testing.assert_allclose(table.extra_embeddings, projected, rtol=1e-5, atol=1e-5)

    vectors = np.random.default_rng(3).normal(size=(4, rt.d_model)).astype(np.float32)
    # a new item counts as one with no training events: the penalty leaves its score alone
    bias = np.concatenate([popularity_bias(np.array([0, *COUNTS]), penalty), [0.0, 0.0]])
    scores = vectors @ np.vstack([rt.item_embeddings, projected]).T + bias
    exclude = [[1, N_ITEMS + 1], [], [N_ITEMS + 2], [2]]
    want_top, want_scores = top_k_reference(scores, N_ITEMS + 2, exclude)
    top, got_scores = table.top_k(vectors, N_ITEMS + 2, exclude=exclude)
    assert top.tolist() == want_top.tolist()
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-4, atol=1e-4)


def test_files_that_cannot_serve_the_bundle_are_refused(bundle: Path, tmp_path: Path) -> None:
    rt = EncoderRuntime.load(bundle, device="cpu")
    other = tmp_path / "other.npz"
    write_vectors(other, ["new-a"], encoder="another-model")
    with pytest.raises(ValueError, match="another-model"):
        catalogue_items(rt, other)
    wrong_size = tmp_path / "size.npz"
    save_catalogue_vectors(
        wrong_size, CatalogueVectors(["new-a"], np.zeros((1, 3), np.float32), ENCODER)
    )
    with pytest.raises(ValueError, match="content map takes 6"):
        catalogue_items(rt, wrong_size)
    known_only = tmp_path / "known.npz"
    write_vectors(known_only, ITEMS[:3])
    assert not catalogue_items(rt, known_only).extra
    plain = EncoderRuntime.load(bundle_with_map(tmp_path / "plain", content_map=False))
    assert plain.content_map is None
    with pytest.raises(UserError, match="INTEREST_CATALOGUE is set but the bundle"):
        CatalogueWatch(plain, known_only, 1.0)
    assert CatalogueWatch(plain, None, 1.0).current().names.tolist() == [None, *ITEMS]


def wait_for_table(watch: CatalogueWatch, extra: set[str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while set(watch.current().extra) != extra:
        assert time.monotonic() < deadline, f"still {set(watch.current().extra)}, not {extra}"
        time.sleep(0.01)


def test_the_watch_follows_the_file_and_keeps_serving_through_a_bad_one(
    bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rt = EncoderRuntime.load(bundle, device="cpu")
    path = tmp_path / "catalogue.npz"
    watch = CatalogueWatch(rt, path, poll_seconds=0.0)  # no file yet: the model's items
    assert not watch.current().extra
    write_vectors(path, ["new-a"])
    wait_for_table(watch, {"new-a"})
    write_vectors(path, ["new-a", "new-b", ITEMS[3]], seed=5)  # rewritten while serving
    wait_for_table(watch, {"new-a", "new-b"})
    with caplog.at_level(logging.ERROR, logger="streams.catalogue"):
        path.write_bytes(b"half a file")
        deadline = time.monotonic() + 10
        while "refused" not in caplog.text:
            assert time.monotonic() < deadline
            assert set(watch.current().extra) == {"new-a", "new-b"}  # the last good table
            time.sleep(0.01)
    write_vectors(path, ["new-c"])
    wait_for_table(watch, {"new-c"})
    watch.close()
    started = CatalogueWatch(rt, path, poll_seconds=60.0)  # at start: read at once
    assert set(started.current().extra) == {"new-c"}
    assert model_items(rt).names.tolist() == [None, *ITEMS]


def test_the_recommender_ranks_new_items_and_excludes_those_the_user_met(
    bundle: Path, tmp_path: Path
) -> None:
    rt = EncoderRuntime.load(bundle, device="cpu")
    path = tmp_path / "catalogue.npz"
    new = [f"new-{i}" for i in range(5)]
    write_vectors(path, new)
    recommender = EncoderRecommender(rt, cache_users=10, catalogue=path)
    table = recommender.items.current()
    everything = N_ITEMS + len(new)
    window: list[WindowEntry] = []
    first = recommender.recommend(one_event_batch(window, ITEMS[1], 0, everything))
    (rec,) = first.recommendations
    assert set(new) <= set(rec.item_ids)  # every item but the one seen is in a full ranking
    vector = np.frombuffer(first.updates["u"].vector, np.float32)
    for item, score in zip(rec.item_ids, rec.scores, strict=True):
        if item in table.extra:
            embedding = table.extra_embeddings[table.extra[item] - N_ITEMS - 1]
            assert score == pytest.approx(float(vector @ embedding), rel=1e-4, abs=1e-4)

    # An event on a new item: the state stays as it is, and the item is not shown again,
    # in this batch and in later ones (from the window, through the cache).
    second = recommender.recommend(one_event_batch(window, new[0], 1, everything))
    assert second.updates["u"].vector == first.updates["u"].vector
    assert new[0] not in second.recommendations[0].item_ids
    third = recommender.recommend(one_event_batch(window, ITEMS[2], 2, everything))
    assert new[0] not in third.recommendations[0].item_ids
    assert set(new[1:]) <= set(third.recommendations[0].item_ids)
    assert len(third.recommendations[0].item_ids) == everything - 3


def test_a_new_item_recommended_under_explanations_carries_no_events(
    bundle: Path, tmp_path: Path
) -> None:
    rt = EncoderRuntime.load(bundle, device="cpu")
    path = tmp_path / "catalogue.npz"
    write_vectors(path, ["new-a", "new-b"])
    recommender = EncoderRecommender(rt, cache_users=10, explain_events=2, catalogue=path)
    window: list[WindowEntry] = []
    recommender.recommend(one_event_batch(window, ITEMS[1], 0, 3))
    result = recommender.recommend(one_event_batch(window, ITEMS[4], 1, N_ITEMS + 2))
    rec = result.recommendations[0]
    assert rec.because is not None
    for item, because in zip(rec.item_ids, rec.because, strict=True):
        if item.startswith("new-"):
            assert because == []
        else:
            assert all(event["item_id"] in (ITEMS[1], ITEMS[4]) for event in because)
