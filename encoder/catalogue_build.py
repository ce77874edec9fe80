"""`interest catalogue`: a catalogue file -> content vectors for the worker, and, for a trained
model, the map from content to its item space.

Two products, with different lives: the vectors file (encoder/catalogue_vectors.py) depends on
the catalogue alone and is rewritten whenever items are added; the content map
(encoder/content_map.py) depends on the model alone and is fitted once per training, before
`interest export` puts it in the bundle.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from encoder.catalogue import read_catalogue
from encoder.catalogue_vectors import CatalogueVectors, save_catalogue_vectors
from encoder.content import SENTENCE_MODEL, embed_texts, load_sentence_model
from encoder.content_map import fit_content_map, save_content_map
from encoder.evaluate import load_model
from encoder.model import InterestEncoder


def build_catalogue(
    catalogue: Path, out: Path, item_map: Path | None = None, model_dir: Path | None = None
) -> dict[str, Any]:
    """Embed every item of ``catalogue`` into ``out``; with ``model_dir``, fit its content map
    on the items both know and save it there. Returns a JSON-able summary."""
    started = time.perf_counter()
    items = read_catalogue(catalogue, item_map)
    # Read before the embedding, so that a wrong directory fails at once.
    model = load_model(model_dir) if model_dir is not None else None
    vectors = embed_texts(items.texts, load_sentence_model())
    save_catalogue_vectors(out, CatalogueVectors(items.item_ids, vectors, SENTENCE_MODEL))
    summary: dict[str, Any] = {
        "items": len(items),
        "unmapped": items.unmapped,
        "encoder": SENTENCE_MODEL,
        "out": str(out),
        "embed_seconds": round(time.perf_counter() - started, 2),
    }
    if model is not None and model_dir is not None:
        summary.update(fit_for_model(model_dir, model, items.item_ids, vectors))
    return summary


def fit_for_model(
    model_dir: Path,
    model: tuple[InterestEncoder, list[str]],
    item_ids: list[str],
    vectors: np.ndarray,
) -> dict[str, Any]:
    """Fit the content map of ``model`` (encoder and item vocabulary) and save it in its
    directory."""
    started = time.perf_counter()
    encoder, model_items = model
    row_of = {item: i for i, item in enumerate(item_ids)}
    both = [(index, row_of[item]) for index, item in enumerate(model_items, 1) if item in row_of]
    if not both:
        raise UserError(f"no item of the catalogue is one the model in {model_dir} knows")
    table = encoder.item_embeddings().detach().numpy()
    try:
        content_map = fit_content_map(
            vectors[[row for _, row in both]], table[[index for index, _ in both]], SENTENCE_MODEL
        )
    except ValueError as exc:
        raise UserError(f"{model_dir}: {exc}") from None
    path = save_content_map(model_dir, content_map)
    return {
        "content_map": str(path),
        "model_items_with_content": len(both),
        "model_items_without_content": len(model_items) - len(both),
        "new_items": len(item_ids) - len(both),
        "alpha": content_map.alpha,
        "cv_r2": round(content_map.cv_r2, 4),
        "scale": round(content_map.scale, 4),
        "fit_seconds": round(time.perf_counter() - started, 2),
    }
