"""The bundle format: what a bundle directory holds, how it is named, sealed and verified.

The exporter (export/bundle.py) writes bundles and the runtime (export/runtime.py) reads them;
both take every name below from here, so the layout has one owner, and
tests/export/test_bundle_format.py pins it. Changing anything a runtime reads means a new
``BUNDLE_FORMAT``: a worker refuses a bundle of another format instead of misreading it.

A bundle is a directory:

    full.onnx            window (B,T) + persisted memory -> vector at the last event + state
    step.onnx            one event per user (B,) + state -> vector + the event's cache slots,
                         the new memory and the next ring position
    step_stage_<i>.onnx  step.onnx cut at its attention reads, n_layers + 1 graphs (the
                         worker's step; the attention runs in place, export/slab_attention.py)
    attention_bias.npy   (n_layers, span, H) float32: the attention's bias by event age
    items.json           item ids in model index order; entry 0 is null (padding)
    item_embeddings.npy  (n_items + 1, d) float32, row 0 = padding; scores are dot products
    item_counts.npy      (n_items + 1,) int64 training events per item, 0 at the padding: the
                         long-tail split and the popularity penalty (encoder/popularity.py)
    content_map.npy      (c + 1, d) float32, only in a bundle of a model with a content map
                         (encoder/content_map.py): content vector -> item embedding, the last
                         row the bias; the manifest's ``content_map`` names its content space
    manifest.json        everything below, sealed by its own sha256

The state passed between the graphs (one row per user, names in ``state_names`` order):

    keys_<layer>    (B, H, span-1, hd+1)  per cached event: [key | mask]
    values_<layer>  (B, H, span-1, hd+1)  [value | 1]
    memory          (B, d)                the decayed memory after the user's last event
    ring            (B,) int64            the slot of the oldest cached event, where the
                                          next one is written

The manifest (JSON, keys sorted) holds ``MANIFEST_KEYS``: the format, the model's config and
training metrics, the content map's description (null without one: ``content_map_info``),
the state layout (name, dtype, shape with -1 for the user axis, slot_axis of the caches),
each graph's file and input/output names, the ONNX-vs-torch parity measured at
export, and ``files``: the sha256 of every other file. ``version`` is a hash of those
checksums (equal content, equal version: the worker's cache keys use it), and
``manifest_sha256`` the hash of the manifest without itself. ``verify_bundle`` checks all of
them, so a bundle that loads is byte for byte what the exporter checked.

Stdlib only: the worker imports this through the runtime, which must not import torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# 2: ring-buffer step state; 3: the step's stages and attention biases; 4: item counts;
# 5: the content map
BUNDLE_FORMAT = "interest-bundle/5"

MANIFEST = "manifest.json"
FULL_GRAPH_FILE = "full.onnx"
STEP_GRAPH_FILE = "step.onnx"
ITEMS_FILE = "items.json"
ITEM_EMBEDDINGS_FILE = "item_embeddings.npy"
ATTENTION_BIAS_FILE = "attention_bias.npy"
ITEM_COUNTS_FILE = "item_counts.npy"
CONTENT_MAP_FILE = "content_map.npy"

MANIFEST_KEYS = frozenset(
    {
        "format",
        "version",
        "manifest_sha256",
        "files",
        "created_at",
        "export_seconds",
        "source_model",
        "config",
        "metrics",
        "content_map",
        "receptive_field",
        "event_types",
        "d_model",
        "n_items",
        "state",
        "memory_state",
        "graphs",
        "parity",
        "opset",
        "torch_version",
    }
)
# What the exporter fills in; the rest ``write_manifest`` derives from the files.
SEALED_KEYS = frozenset({"format", "version", "manifest_sha256", "files"})

MEMORY_STATE = "memory"
RING_STATE = "ring"
SLOT_AXIS = 2  # the cached-event axis of the attention caches

FULL_INPUTS = ["items", "types", "gaps", "memory_in", "has_memory"]


class BundleError(Exception):
    """The bundle is missing, incomplete or corrupted; the message says which file and why."""


# ---------------------------------------------------------------------- names


def stage_files(n_layers: int) -> list[str]:
    return [f"step_stage_{index}.onnx" for index in range(n_layers + 1)]


def bundle_files(n_layers: int, content_map: bool = False) -> list[str]:
    """Every file a bundle of an ``n_layers`` model holds besides the manifest, sorted."""
    fixed = [FULL_GRAPH_FILE, STEP_GRAPH_FILE, ITEMS_FILE, ITEM_EMBEDDINGS_FILE, ITEM_COUNTS_FILE]
    optional = [CONTENT_MAP_FILE] if content_map else []
    return sorted([*fixed, *optional, ATTENTION_BIAS_FILE, *stage_files(n_layers)])


def state_names(n_layers: int) -> list[str]:
    caches = [f"{kind}_{i}" for i in range(n_layers) for kind in ("keys", "values")]
    return [*caches, MEMORY_STATE, RING_STATE]


def full_outputs(n_layers: int) -> list[str]:
    """full.onnx returns the vector and the whole state (ONNX names must be unique across
    inputs and outputs, hence the prefixes)."""
    return ["vector", *(f"out_{n}" for n in state_names(n_layers))]


def step_inputs(n_layers: int) -> list[str]:
    return ["items", "types", "gaps", *(f"in_{n}" for n in state_names(n_layers))]


def step_outputs(n_layers: int) -> list[str]:
    """The vector, then per state: a cache's new slot, the new memory, the next ring."""
    names = state_names(n_layers)
    return ["vector", *(f"slot_{n}" for n in names[:-2]), *(f"out_{n}" for n in names[-2:])]


def stage_inputs(index: int, n_layers: int) -> list[str]:
    if index == 0:
        return ["items", "types", "gaps"]
    return ["x", "y"] if index < n_layers else ["x", "y", "memory", "items"]


def stage_outputs(index: int, n_layers: int) -> list[str]:
    return ["x_out", "query", "key", "value"] if index < n_layers else ["vector", "memory_out"]


# ---------------------------------------------------------------------- checksums


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_version(files: dict[str, str]) -> str:
    """Bundle version: a hash of every file's checksum, so equal content gives equal version."""
    h = hashlib.sha256()
    for name, digest in sorted(files.items()):
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()[:16]


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own digest field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Seal the files in ``directory`` with ``fields`` into manifest.json; return the manifest.

    ``fields`` are the manifest's keys but ``SEALED_KEYS``; the checksums, the version and the
    digest come from the files, so call this last, when every other file is written.
    """
    if fields.keys() != MANIFEST_KEYS - SEALED_KEYS:
        want = sorted(MANIFEST_KEYS - SEALED_KEYS)
        raise ValueError(f"manifest fields must be {want}, not {sorted(fields)}")
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}
    manifest = {**fields, "format": BUNDLE_FORMAT, "version": content_version(files)}
    manifest["files"] = files
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


# ---------------------------------------------------------------------- verification


def verify_bundle(path: Path) -> dict[str, Any]:
    """Read the manifest, check every listed file's sha256 and that the files the runtime
    opens are listed; return the manifest. Raises BundleError naming the file and the reason."""
    manifest = _read_manifest(path)
    files = manifest.get("files")
    mpath = path / MANIFEST
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{mpath}: no file checksums")
    for name, digest in sorted(files.items()):
        fpath = path / name
        if not fpath.is_file():
            raise BundleError(f"{path}: incomplete bundle, {name} is missing")
        if sha256_file(fpath) != digest:
            raise BundleError(
                f"{path}: checksum mismatch for {name} (corrupted or modified after export)"
            )
    if content_version(files) != manifest.get("version"):
        raise BundleError(f"{mpath}: version does not match the file checksums")
    if manifest_digest(manifest) != manifest.get("manifest_sha256"):
        raise BundleError(f"{mpath}: manifest was modified after export (manifest_sha256)")
    for name in _opened_files(manifest):
        if name not in files:
            raise BundleError(f"{path}: manifest lists no {name}")
    return manifest


def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle directory")
    if not mpath.is_file():
        raise BundleError(f"{path}: no {MANIFEST}; is this an `interest export` bundle?")
    try:
        manifest = json.loads(mpath.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{mpath}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(
            f"{mpath}: format {found!r}, expected {BUNDLE_FORMAT}"
            " (export the model again with `interest export`)"
        )
    return manifest


def stage_files_listed(manifest: dict[str, Any]) -> list[str]:
    """The step's stage graphs in stage order, as the manifest lists them."""
    return [stage["file"] for stage in manifest["graphs"].get("stages", [])]


def content_map_info(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's description of the bundle's content map (``encoder``: the sentence
    model whose space it maps from, ``content_dim``, and how it was fitted); None without one."""
    info = manifest.get("content_map")
    return info if isinstance(info, dict) else None


def _opened_files(manifest: dict[str, Any]) -> list[str]:
    """The files the runtime opens, the stages as the manifest lists them."""
    stages = stage_files_listed(manifest)
    fixed = [FULL_GRAPH_FILE, STEP_GRAPH_FILE, ITEMS_FILE, ITEM_EMBEDDINGS_FILE, ITEM_COUNTS_FILE]
    optional = [CONTENT_MAP_FILE] if content_map_info(manifest) is not None else []
    return [*fixed, *optional, ATTENTION_BIAS_FILE, *stages]
