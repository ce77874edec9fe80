"""The content map and the catalogue vectors file, on synthetic data (no sentence model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from encoder.catalogue_vectors import (
    CatalogueVectors,
    load_catalogue_vectors,
    save_catalogue_vectors,
)
from encoder.content_map import (
    MODEL_DIR_FILE,
    fit_content_map,
    load_content_map,
    project,
    save_content_map,
)


def synthetic(n: int, c: int = 24, d: int = 8, noise: float = 0.05, seed: int = 0):
    """Content vectors and item embeddings that a linear map explains up to some noise."""
    rng = np.random.default_rng(seed)
    content = rng.normal(size=(n, c)).astype(np.float32)
    content /= np.linalg.norm(content, axis=1, keepdims=True)
    true = rng.normal(size=(c, d))
    bias = rng.normal(size=d)
    embeddings = content @ true + bias + noise * rng.normal(size=(n, d))
    return content, embeddings.astype(np.float32), true, bias


def test_a_projected_known_item_lands_near_its_trained_embedding() -> None:
    content, embeddings, _, _ = synthetic(400)
    fitted = fit_content_map(content[:300], embeddings[:300], "m")
    assert fitted.items == 300 and fitted.encoder == "m" and fitted.content_dim == 24
    assert fitted.weights.shape == (25, 8) and fitted.weights.dtype == np.float32
    assert fitted.cv_r2 > 0.95
    for rows in (slice(0, 300), slice(300, 400)):  # items it was fitted on, and unseen ones
        got = fitted.project(content[rows])
        want = embeddings[rows]
        cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cosine.min() > 0.95
        # nearer its own embedding than any other item's
        distances = ((got[:, None] - want[None]) ** 2).sum(-1)
        assert (distances.argmin(axis=1) == np.arange(len(want))).mean() > 0.95


def test_cross_validation_picks_more_shrinkage_for_noisier_targets() -> None:
    content, embeddings, _, _ = synthetic(60, c=40, noise=0.05)
    noisy_content, noisy, _, _ = synthetic(60, c=40, noise=3.0)
    assert (
        fit_content_map(noisy_content, noisy, "m").alpha
        > fit_content_map(content, embeddings, "m").alpha
    )


def test_projections_are_as_long_as_the_trained_embeddings_on_average() -> None:
    """A weak fit shrinks its predictions towards the mean item; the map is scaled back so
    the known items' projections have their embeddings' mean length, their order unchanged."""
    content, embeddings, _, _ = synthetic(200, c=40, noise=3.0)
    fitted = fit_content_map(content, embeddings, "m")
    assert fitted.cv_r2 < 0.5 and fitted.scale > 1.2
    lengths = np.linalg.norm(fitted.project(content), axis=1)
    assert lengths.mean() == pytest.approx(np.linalg.norm(embeddings, axis=1).mean(), rel=1e-4)
    unscaled = fitted.weights / fitted.scale
    user = np.random.default_rng(9).normal(size=8)
    np.testing.assert_array_equal(
        np.argsort(fitted.project(content) @ user), np.argsort(project(unscaled, content) @ user)
    )


def test_too_few_items_or_mismatched_rows_refuse_to_fit() -> None:
    content, embeddings, _, _ = synthetic(20)
    with pytest.raises(ValueError, match="too few"):
        fit_content_map(content[:5], embeddings[:5], "m")
    with pytest.raises(ValueError, match="one row per item"):
        fit_content_map(content, embeddings[:10], "m")


def test_saved_with_the_model_and_stale_once_it_is_trained_again(tmp_path: Path) -> None:
    content, embeddings, _, _ = synthetic(100)
    fitted = fit_content_map(content, embeddings, "m")
    (tmp_path / "model.pt").write_bytes(b"weights")
    assert load_content_map(tmp_path) is None
    save_content_map(tmp_path, fitted)
    loaded = load_content_map(tmp_path)
    assert loaded is not None and (tmp_path / MODEL_DIR_FILE).is_file()
    np.testing.assert_array_equal(loaded.weights, fitted.weights)
    assert (loaded.encoder, loaded.alpha, loaded.items) == ("m", fitted.alpha, 100)
    assert (loaded.cv_r2, loaded.scale) == (fitted.cv_r2, fitted.scale)
    np.testing.assert_allclose(project(loaded.weights, content[:3]), fitted.project(content[:3]))
    (tmp_path / "model.pt").write_bytes(b"other weights")
    with pytest.raises(ValueError, match="other weights"):
        load_content_map(tmp_path)


def test_catalogue_vectors_round_trip_and_refusals(tmp_path: Path) -> None:
    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)
    path = save_catalogue_vectors(
        tmp_path / "sub" / "c.npz", CatalogueVectors(["a", "bé", "7"], vectors, "m")
    )
    loaded = load_catalogue_vectors(path)
    assert loaded.item_ids == ["a", "bé", "7"] and loaded.encoder == "m"
    np.testing.assert_array_equal(loaded.vectors, vectors)
    assert [p.name for p in path.parent.iterdir()] == ["c.npz"]  # no temporary left behind
    with pytest.raises(ValueError, match="listed twice"):
        CatalogueVectors(["a", "a"], np.zeros((2, 2), np.float32), "m")
    with pytest.raises(ValueError, match="2 item ids but vectors"):
        CatalogueVectors(["a", "b"], np.zeros((3, 2), np.float32), "m")
    with pytest.raises(ValueError, match="NaN"):
        CatalogueVectors(["a"], np.full((1, 2), np.nan, np.float32), "m")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a catalogue vectors file"):
        load_catalogue_vectors(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", vectors=vectors)
    with pytest.raises(ValueError, match="no item_ids"):
        load_catalogue_vectors(tmp_path / "other.npz")
