"""`interest export`: bad model directories are one-line UserErrors; the bundle is complete."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.errors import UserError
from export.bundle import export_bundle
from interest.cli import app


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def test_missing_model_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        export_bundle(model_dir=tmp_path / "nope", out=tmp_path / "b")


@pytest.mark.parametrize("missing", ["config.json", "model.pt", "vocab.json"])
def test_incomplete_model_dir(model_dir: Path, tmp_path: Path, missing: str) -> None:
    bad = _copy(model_dir, tmp_path / "m")
    (bad / missing).unlink()
    with pytest.raises(UserError, match=f"no {missing}"):
        export_bundle(model_dir=bad, out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_corrupt_weights_and_vocab(model_dir: Path, tmp_path: Path) -> None:
    bad = _copy(model_dir, tmp_path / "m")
    (bad / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot load the model") as err:
        export_bundle(model_dir=bad, out=tmp_path / "b")
    assert "\n" not in str(err.value)
    shutil.copy(model_dir / "model.pt", bad / "model.pt")
    (bad / "vocab.json").write_text(json.dumps({"items": ["a", "b"]}))
    with pytest.raises(UserError, match=r"vocab\.json has 2 items"):
        export_bundle(model_dir=bad, out=tmp_path / "b")
    (bad / "vocab.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        export_bundle(model_dir=bad, out=tmp_path / "b")


def test_refuses_to_overwrite_a_non_bundle(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a bundle"):
        export_bundle(model_dir=model_dir, out=out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_export_replaces_a_bundle_with_the_same_version(
    model_dir: Path, bundle: Path, tmp_path: Path
) -> None:
    """Re-exporting the same model over an old bundle gives the same content version."""
    out = _copy(bundle, tmp_path / "bundle")
    (out / "full.onnx").write_bytes(b"stale")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(app, ["export", "--model", str(model_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out)
    new = json.loads((out / "manifest.json").read_text())
    old = json.loads((bundle / "manifest.json").read_text())
    assert new["version"] == old["version"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.")]  # no temp left


def test_exports_what_train_writes(tmp_path: Path) -> None:
    """The model directory of a real (tiny, 1 epoch) training run exports and loads."""
    from encoder.train import train
    from export.runtime import EncoderRuntime

    lines = [f"user{u} item{(u + t) % 20}" for u in range(30) for t in range(10)]
    data = tmp_path / "log.txt"
    data.write_text("\n".join(lines) + "\n")
    tiny = {"d_model": 16, "n_heads": 2, "span": 4, "max_len": 10, "dropout": 0.1}
    train(data=data, out=tmp_path / "model", epochs=1, progress=False, **tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = export_bundle(model_dir=tmp_path / "model", out=tmp_path / "bundle")
    rt = EncoderRuntime.load(bundle)
    vocab = json.loads((tmp_path / "model" / "vocab.json").read_text())["items"]
    assert rt.item_ids == [None, *vocab]
    assert rt.manifest["metrics"]["epochs"] == 1
    idx = rt.index_of(["item3", "item4", "item5"])
    vec, _ = rt.rebuild([idx], [[0, 0, 0]], [[0, 0, 0]])
    top, _ = rt.top_k(vec, 3, exclude=[idx])
    assert top.shape == (1, 3) and not set(top[0].tolist()) & set(idx.tolist())
