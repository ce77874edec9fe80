"""The worker-facing runtime: checksums, unknown items, top-k, providers, no torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from export import sessions
from export.runtime import (
    UNKNOWN,
    BundleError,
    EncoderRuntime,
    EncoderStates,
)

from .conftest import ITEM_IDS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bundle_copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def test_flipped_byte_in_step_graph_is_refused(bundle_copy: Path) -> None:
    path = bundle_copy / "step.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"checksum mismatch for step\.onnx"):
        EncoderRuntime.load(bundle_copy)


def test_missing_items_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "items.json").unlink()
    with pytest.raises(BundleError, match=r"incomplete bundle, items\.json is missing"):
        EncoderRuntime.load(bundle_copy)


def test_missing_or_edited_manifest_is_refused(bundle_copy: Path) -> None:
    path = bundle_copy / "manifest.json"
    original = path.read_text()
    manifest = json.loads(original)
    manifest["version"] = "0" * 16
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="version does not match"):
        EncoderRuntime.load(bundle_copy)
    manifest = json.loads(original)
    manifest["receptive_field"] = 3  # everything but the manifest's own digest still matches
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="modified after export"):
        EncoderRuntime.load(bundle_copy)
    path.write_text(original)
    EncoderRuntime.load(bundle_copy)  # and the untouched copy loads
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        EncoderRuntime.load(bundle_copy)
    with pytest.raises(BundleError, match="not a bundle directory"):
        EncoderRuntime.load(bundle_copy / "nope")


def test_a_bundle_of_the_previous_format_asks_for_a_new_export(bundle_copy: Path) -> None:
    """Format 1 bundles (caches shifted every step, no ring) cannot run on this runtime."""
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format"] = "interest-bundle/1"
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"interest-bundle/1.*export the model again"):
        EncoderRuntime.load(bundle_copy)


def test_manifest_describes_the_bundle(runtime: EncoderRuntime, bundle: Path) -> None:
    m = runtime.manifest
    stages = {f"step_stage_{i}.onnx" for i in range(m["config"]["n_layers"] + 1)}
    assert set(m["files"]) == {
        "full.onnx",
        "step.onnx",
        "items.json",
        "item_embeddings.npy",
        "item_counts.npy",
        "attention_bias.npy",
        *stages,
    }
    assert {stage["file"] for stage in m["graphs"]["stages"]} == stages
    assert m["receptive_field"] == m["config"]["receptive_field"] == 9
    assert m["metrics"] == {"ndcg@10": 0.123}
    assert set(m["parity"]) == {
        "full_max_abs_diff",
        "step_max_abs_diff",
        "staged_step_max_abs_diff",
    }
    assert max(m["parity"].values()) <= 1e-4
    assert runtime.version == m["version"] and len(runtime.version) == 16
    assert runtime.item_ids == [None, *ITEM_IDS]
    assert runtime.item_embeddings.shape == (len(ITEM_IDS) + 1, 16)
    assert runtime.event_types == ["click", "purchase", "view", "add_to_cart", "favorite"]
    assert runtime.n_time_buckets == 8


def test_unknown_item_ids(runtime: EncoderRuntime) -> None:
    idx = runtime.index_of(["item-3", "never-seen", "item-40", ""])
    assert idx.tolist() == [3, UNKNOWN, 40, UNKNOWN]
    assert runtime.ids_of([3, 0, UNKNOWN, 40]) == ["item-3", None, None, "item-40"]

    # rebuild drops events with unknown items...
    items = [np.array([3, UNKNOWN, 5, 7]), np.array([UNKNOWN])]
    types = [np.array([0, 1, 2, 3]), np.array([0])]
    gaps = [np.array([1, 2, 3, 4]), np.array([0])]
    vec, st = runtime.rebuild(items, types, gaps)
    vec_ref, _ = runtime.rebuild(
        [np.array([3, 5, 7]), np.array([], np.int64)],
        [np.array([0, 2, 3]), np.array([], np.int64)],
        [np.array([1, 3, 4]), np.array([], np.int64)],
    )
    np.testing.assert_allclose(vec, vec_ref, atol=1e-6)
    assert not vec[1].any()  # a user with no known event has no vector yet

    # ...and step skips them: same state, previous vector.
    vec2, st2 = runtime.step(st, [UNKNOWN, 9], [0, 0], [1, 1])
    np.testing.assert_array_equal(vec2[0], vec[0])
    for name in st.arrays:
        np.testing.assert_array_equal(st2.arrays[name][0], st.arrays[name][0])
    first_event, _ = runtime.rebuild([[9]], [[0]], [[1]])  # the empty user took its first step
    np.testing.assert_allclose(vec2[1], first_event[0], atol=1e-5)


def test_empty_batches(runtime: EncoderRuntime) -> None:
    vec, st = runtime.rebuild([], [], [])
    assert vec.shape == (0, 16) and len(st) == 0
    vec, st = runtime.step(st, [], [], [])
    assert vec.shape == (0, 16) and len(st) == 0
    idx, scores = runtime.top_k(vec, 5, exclude=[])
    assert idx.shape == scores.shape == (0, 5)


def test_states_stack_split_round_trip(runtime: EncoderRuntime) -> None:
    _, st = runtime.rebuild(
        [[1, 2, 3], [4], [5, 6]], [[0, 0, 0], [1], [2, 2]], [[0, 1, 2], [0], [0, 1]]
    )
    parts = st.split()
    assert [len(p) for p in parts] == [1, 1, 1]
    again = EncoderStates.stack(parts)
    for name in st.arrays:
        np.testing.assert_array_equal(again.arrays[name], st.arrays[name])
    assert not np.shares_memory(parts[0].arrays["keys_0"], st.arrays["keys_0"])
    assert st.nbytes == sum(p.nbytes for p in parts)


def test_top_k_on_runtime(runtime: EncoderRuntime) -> None:
    vec, _ = runtime.rebuild([[1, 2, 3]], [[0, 0, 0]], [[0, 1, 1]])
    idx, scores = runtime.top_k(vec, 5, exclude=[[1, 2, 3]])
    assert idx.shape == scores.shape == (1, 5)
    assert not set(idx[0].tolist()) & {0, 1, 2, 3}
    assert np.all(np.diff(scores[0]) <= 0)


def test_provider_choice(monkeypatch: pytest.MonkeyPatch, runtime: EncoderRuntime) -> None:
    listed = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(sessions.ort, "get_available_providers", lambda: listed)
    monkeypatch.setattr(sessions, "_cuda_device_count", lambda: 0)
    assert sessions.choose_providers("auto") == ["CPUExecutionProvider"]  # listed but no GPU
    monkeypatch.setattr(sessions, "_cuda_device_count", lambda: 1)
    assert sessions.choose_providers("auto") == listed
    assert sessions.choose_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError):
        sessions.choose_providers("tpu")
    if sessions._cuda_device_count() == 0:  # this machine: the CPU fallback is what runs
        assert runtime.provider == "CPUExecutionProvider"


def test_runtime_does_not_import_torch(bundle: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from export.runtime import EncoderRuntime
        rt = EncoderRuntime.load({str(bundle)!r})
        vec, st = rt.rebuild([[1, 2, 3]], [[0, 1, 0]], [[0, 2, 2]])
        vec, st = rt.step(st, rt.index_of(["item-4"]), [0], [1])
        rt.top_k(vec, 3, exclude=[[1, 2, 3, 4]])
        assert "torch" not in sys.modules, "runtime imported torch"
        print(rt.provider)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ExecutionProvider")
