"""The bundle's storage layout, pinned: file names, manifest keys, state layout, graph names.

A worker loads bundles written by other versions of this code, so a change here is a change
of format: it needs a new BUNDLE_FORMAT (and these literals updated with it).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from encoder.content_map import ContentMap, save_content_map
from encoder.model import InterestEncoder
from export import bundle_format as fmt
from export.bundle import export_bundle, save_model_dir
from tests.export.conftest import ITEM_IDS

LAYERS = 2  # the tiny model of conftest.py: 2 layers, 2 heads, d 16, span 5
CONTENT_DIM = 6

FILES = [
    "attention_bias.npy",
    "full.onnx",
    "item_counts.npy",
    "item_embeddings.npy",
    "items.json",
    "step.onnx",
    "step_stage_0.onnx",
    "step_stage_1.onnx",
    "step_stage_2.onnx",
]
MANIFEST_KEYS = {
    "config",
    "content_map",
    "created_at",
    "d_model",
    "event_types",
    "export_seconds",
    "files",
    "format",
    "graphs",
    "manifest_sha256",
    "memory_state",
    "metrics",
    "n_items",
    "opset",
    "parity",
    "receptive_field",
    "source_model",
    "state",
    "torch_version",
    "version",
}
CACHE = {"dtype": "float32", "shape": [-1, 2, 4, 9], "slot_axis": 2}  # (user, H, span-1, hd+1)
STATE = [
    {"name": "keys_0", **CACHE},
    {"name": "values_0", **CACHE},
    {"name": "keys_1", **CACHE},
    {"name": "values_1", **CACHE},
    {"name": "memory", "dtype": "float32", "shape": [-1, 16]},
    {"name": "ring", "dtype": "int64", "shape": [-1]},
]
STATE_NAMES = [s["name"] for s in STATE]


def test_format_version() -> None:
    assert fmt.BUNDLE_FORMAT == "interest-bundle/5"


def test_exported_bundle_holds_exactly_the_format_files(bundle: Path) -> None:
    assert fmt.bundle_files(LAYERS) == FILES
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*FILES, "manifest.json"])
    manifest = json.loads((bundle / fmt.MANIFEST).read_text())
    assert sorted(manifest["files"]) == FILES


def test_a_content_map_is_one_more_file_described_in_the_manifest(
    model: InterestEncoder, tmp_path: Path
) -> None:
    """A model directory with a content map (`interest catalogue --model`) exports it as
    content_map.npy, listed and checksummed like every file; the manifest names its space."""
    model_dir = save_model_dir(model, ITEM_IDS, tmp_path / "model")
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(CONTENT_DIM + 1, model.cfg.d_model)).astype(np.float32)
    save_content_map(model_dir, ContentMap(weights, "a-sentence-model", 1.0, 40, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = export_bundle(model_dir=model_dir, out=tmp_path / "bundle")
    files = sorted([*FILES, "content_map.npy"])
    assert fmt.bundle_files(LAYERS, content_map=True) == files
    manifest = json.loads((bundle / fmt.MANIFEST).read_text())
    assert sorted(manifest["files"]) == files
    assert manifest["content_map"] == {
        "encoder": "a-sentence-model",
        "content_dim": CONTENT_DIM,
        "alpha": 1.0,
        "items": 40,
        "cv_r2": 0.5,
        "scale": 1.0,
    }
    assert fmt.content_map_info(manifest) == manifest["content_map"]
    np.testing.assert_array_equal(np.load(bundle / fmt.CONTENT_MAP_FILE), weights)


def test_manifest_keys_and_state_layout(bundle: Path) -> None:
    manifest = json.loads((bundle / fmt.MANIFEST).read_text())
    assert set(manifest) == MANIFEST_KEYS == fmt.MANIFEST_KEYS
    assert manifest["content_map"] is None
    assert manifest["format"] == fmt.BUNDLE_FORMAT
    assert manifest["state"] == STATE
    assert fmt.state_names(LAYERS) == STATE_NAMES
    assert manifest["memory_state"] == "memory"
    assert manifest["graphs"]["attention_bias"] == "attention_bias.npy"


def test_graph_names(bundle: Path) -> None:
    graphs = json.loads((bundle / fmt.MANIFEST).read_text())["graphs"]
    assert set(graphs) == {"full", "step", "stages", "attention_bias"}
    assert graphs["full"]["file"] == "full.onnx"
    assert graphs["full"]["inputs"] == ["items", "types", "gaps", "memory_in", "has_memory"]
    assert graphs["full"]["outputs"] == ["vector", *(f"out_{n}" for n in STATE_NAMES)]
    assert graphs["step"]["file"] == "step.onnx"
    assert graphs["step"]["inputs"] == ["items", "types", "gaps", *(f"in_{n}" for n in STATE_NAMES)]
    caches = STATE_NAMES[:-2]
    assert graphs["step"]["outputs"] == [
        "vector",
        *(f"slot_{n}" for n in caches),
        "out_memory",
        "out_ring",
    ]
    assert graphs["stages"] == [
        {
            "file": "step_stage_0.onnx",
            "inputs": ["items", "types", "gaps"],
            "outputs": ["x_out", "query", "key", "value"],
        },
        {
            "file": "step_stage_1.onnx",
            "inputs": ["x", "y"],
            "outputs": ["x_out", "query", "key", "value"],
        },
        {
            "file": "step_stage_2.onnx",
            "inputs": ["x", "y", "memory", "items"],
            "outputs": ["vector", "memory_out"],
        },
    ]


def test_every_graph_loads_on_cpu_as_exported(bundle: Path) -> None:
    """The graphs run on ONNX Runtime's CPU provider as torch wrote them: no patch after the
    export (a bool EyeLike, for one, has no CPU kernel)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for name in FILES:
        if name.endswith(".onnx"):
            ort.InferenceSession(str(bundle / name), so, providers=["CPUExecutionProvider"])


def test_the_manifest_is_sealed_from_the_files(tmp_path: Path) -> None:
    """write_manifest derives the checksums, version and digest, and takes every other key."""
    (tmp_path / "a.bin").write_bytes(b"a")
    fields = {key: None for key in fmt.MANIFEST_KEYS - fmt.SEALED_KEYS}
    manifest = fmt.write_manifest(tmp_path, fields)
    assert manifest["files"] == {"a.bin": fmt.sha256_file(tmp_path / "a.bin")}
    assert manifest["version"] == fmt.content_version(manifest["files"])
    assert manifest["manifest_sha256"] == fmt.manifest_digest(manifest)
    assert json.loads((tmp_path / fmt.MANIFEST).read_text()) == manifest
    with pytest.raises(ValueError, match="manifest fields"):
        fmt.write_manifest(tmp_path, {**fields, "version": "mine"})
    with pytest.raises(ValueError, match="manifest fields"):
        fmt.write_manifest(tmp_path, {k: v for k, v in fields.items() if k != "config"})
