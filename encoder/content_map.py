"""The map from content vectors to a trained model's item space: how an item nobody has
interacted with yet gets an embedding the model can rank.

A ridge regression, fitted on the items the model knows: content vector -> the item's trained
embedding (the output table the scores are dot products with). Why linear and closed form: it
needs only numpy, fits in a moment on thousands of items, and ships as one small matrix that
the worker applies to any new item without torch. The ridge strength is chosen by k-fold
cross-validation over a grid.

Then the map is scaled so that the known items' projections are as long, on average, as their
trained embeddings. Why: ridge predictions shrink towards the mean item (they explain only a
share of the embeddings' variance), and in a dot-product ranking a short embedding scores low
for every user, so unscaled, a new item would all but never reach a top-K among trained
items. The scale leaves the order among new items as it is.

Where it lives: ``content_map.npz`` in the model directory (`interest catalogue --model DIR`
fits it), then ``content_map.npy`` in the bundle `interest export` writes from that directory
(export/bundle_format.py). Numpy only: the worker imports ``project``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODEL_DIR_FILE = "content_map.npz"
MODEL_WEIGHTS = "model.pt"  # what `interest train` writes the weights to
ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
FOLDS = 5


@dataclass(frozen=True, eq=False)
class ContentMap:
    """embedding = content @ weights[:-1] + weights[-1]."""

    weights: np.ndarray  # (c + 1, d) float32: the matrix, then the bias row
    encoder: str  # the sentence model whose content space it maps from
    alpha: float  # the ridge strength cross-validation chose
    items: int  # items it was fitted on
    cv_r2: float  # share of the embeddings' variance it explains on held-out folds
    scale: float = 1.0  # the length correction folded into ``weights``

    @property
    def content_dim(self) -> int:
        return self.weights.shape[0] - 1

    def project(self, content: np.ndarray) -> np.ndarray:
        return project(self.weights, content)


def project(weights: np.ndarray, content: np.ndarray) -> np.ndarray:
    """(N, c) content vectors -> (N, d) float32 item embeddings."""
    content = np.asarray(content, np.float32).reshape(-1, weights.shape[0] - 1)
    return (content @ weights[:-1] + weights[-1]).astype(np.float32)


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """(c + 1, d) weights of a ridge fit with an unpenalised intercept (centred data)."""
    return _ridge_path(x, y, (alpha,))[0]


def _ridge_path(x: np.ndarray, y: np.ndarray, alphas: tuple[float, ...]) -> list[np.ndarray]:
    """The ridge weights for each alpha from one eigendecomposition of the Gram matrix."""
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc = x - x_mean
    eigenvalues, vectors = np.linalg.eigh(xc.T @ xc)
    projected = vectors.T @ (xc.T @ (y - y_mean))  # (c, d)
    out = []
    for alpha in alphas:
        w = vectors @ (projected / (eigenvalues + alpha)[:, None])
        out.append(np.vstack([w, y_mean - x_mean @ w]))
    return out


def _cv_errors(x: np.ndarray, y: np.ndarray, alphas: tuple[float, ...], seed: int) -> np.ndarray:
    """Mean squared error on held-out folds for each alpha."""
    folds = np.random.default_rng(seed).permutation(len(x)) % FOLDS
    errors = np.zeros(len(alphas))
    for fold in range(FOLDS):
        test = folds == fold
        for a, w in enumerate(_ridge_path(x[~test], y[~test], alphas)):
            errors[a] += ((x[test] @ w[:-1] + w[-1] - y[test]) ** 2).sum()
    return errors / y.size


def fit_content_map(
    content: np.ndarray,
    embeddings: np.ndarray,
    encoder: str,
    alphas: tuple[float, ...] = ALPHAS,
    seed: int = 0,
) -> ContentMap:
    """Fit on known items: ``content`` (N, c) and their trained ``embeddings`` (N, d)."""
    x = np.asarray(content, np.float64)
    y = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"content {x.shape} and embeddings {y.shape} need one row per item")
    if len(x) < 2 * FOLDS:
        raise ValueError(f"{len(x)} items with both content and an embedding: too few to fit")
    errors = _cv_errors(x, y, alphas, seed)
    best = int(np.argmin(errors))
    variance = float(((y - y.mean(axis=0)) ** 2).mean())
    weights = _ridge(x, y, alphas[best])
    lengths = np.linalg.norm(x @ weights[:-1] + weights[-1], axis=1).mean()
    scale = float(np.linalg.norm(y, axis=1).mean() / lengths) if lengths > 0 else 1.0
    r2 = 1.0 - float(errors[best]) / variance if variance > 0 else 0.0
    weights = (weights * scale).astype(np.float32)
    return ContentMap(weights, encoder, float(alphas[best]), len(x), r2, scale)


def model_digest(model_dir: Path) -> str:
    """sha256 of the model's weights file: a map fitted to other weights is stale."""
    return hashlib.sha256((Path(model_dir) / MODEL_WEIGHTS).read_bytes()).hexdigest()


def save_content_map(model_dir: Path, content_map: ContentMap) -> Path:
    """Into the model directory, with the digest of the weights it was fitted to."""
    path = Path(model_dir) / MODEL_DIR_FILE
    np.savez(
        path,
        model_sha256=np.array(model_digest(model_dir)),
        weights=content_map.weights,
        encoder=np.array(content_map.encoder),
        alpha=np.array(content_map.alpha),
        items=np.array(content_map.items),
        cv_r2=np.array(content_map.cv_r2),
        scale=np.array(content_map.scale),
    )
    return path


def load_content_map(model_dir: Path) -> ContentMap | None:
    """The model directory's content map; None when it has none. ValueError when it was
    fitted to other weights than the directory's model (trained again since)."""
    path = Path(model_dir) / MODEL_DIR_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        if str(data["model_sha256"]) != model_digest(model_dir):
            raise ValueError("fitted to other weights than the model's (trained again since?)")
        return ContentMap(
            data["weights"].astype(np.float32),
            str(data["encoder"]),
            float(data["alpha"]),
            int(data["items"]),
            float(data["cv_r2"]),
            float(data["scale"]),
        )
