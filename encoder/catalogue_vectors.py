"""The catalogue vectors file: item ids and their content vectors, as `interest catalogue`
writes it and the worker (INTEREST_CATALOGUE) reads it.

An ``.npz`` of three arrays, no pickles:

    item_ids  (N,) str      the items, as the event log names them
    vectors   (N, c) float32 content vectors (encoder/content.py), one per item
    encoder   () str        the sentence model that made them (their content space)

The file says nothing of any trained model: the same file serves every model whose bundle
carries a content map of the same space, so a retrained model needs no new catalogue, and a new
item needs no new model.

Numpy only: the worker imports this module.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KEYS = ("item_ids", "vectors", "encoder")


@dataclass(frozen=True, eq=False)
class CatalogueVectors:
    item_ids: list[str]
    vectors: np.ndarray  # (N, c) float32
    encoder: str

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.item_ids):
            raise ValueError(
                f"{len(self.item_ids)} item ids but vectors of shape {self.vectors.shape}"
            )
        if len(set(self.item_ids)) != len(self.item_ids):
            raise ValueError("an item id is listed twice")
        if not np.isfinite(self.vectors).all():
            raise ValueError("vectors hold NaN or infinity")


def save_catalogue_vectors(path: Path, catalogue: CatalogueVectors) -> Path:
    """Write atomically (a temporary file in the same directory, then a rename): a worker
    polling the path never reads half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                item_ids=np.array(catalogue.item_ids, dtype=str),
                vectors=np.asarray(catalogue.vectors, np.float32),
                encoder=np.array(catalogue.encoder),
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the worker may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_catalogue_vectors(path: Path) -> CatalogueVectors:
    """Read the file; ValueError (or OSError) with the reason when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in KEYS if key in data.files}
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:  # not .npz, or a pickle
        raise ValueError(f"{path}: not a catalogue vectors file ({exc})") from None
    missing = [key for key in KEYS if key not in arrays]
    if missing:
        raise ValueError(f"{path}: not a catalogue vectors file (no {missing[0]})")
    ids, vectors, encoder = arrays["item_ids"], arrays["vectors"], arrays["encoder"]
    if ids.dtype.kind != "U" or encoder.dtype.kind != "U" or vectors.dtype.kind != "f":
        raise ValueError(f"{path}: item_ids and encoder must be text, vectors numbers")
    try:
        return CatalogueVectors(ids.tolist(), vectors.astype(np.float32), str(encoder))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
