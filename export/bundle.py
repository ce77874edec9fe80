"""Export a trained model directory to the bundle the streaming worker loads.

The bundle's files, manifest and checksums are export/bundle_format.py's; this module makes
them: the ONNX graphs traced from export/graphs.py's wrappers, the item vocabulary and
embeddings, the attention biases, the content map when the model directory has one
(`interest catalogue --model`), then the sealed manifest.

Why two graphs: a user the worker has not cached is rebuilt from the Redis window with
full.onnx (exact from the last ``receptive_field`` events plus the persisted memory); every later
event is one constant-cost step. The exporter checks ONNX-vs-torch parity on random input
before it writes the manifest, so a bundle on disk has passed that check.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import UserError
from encoder.content_map import MODEL_DIR_FILE, ContentMap, load_content_map
from encoder.features import EVENT_TYPES
from encoder.model import EncoderConfig, InterestEncoder
from encoder.popularity import VOCAB_COUNTS_KEY, counts_from_vocab
from export.bundle_format import (
    ATTENTION_BIAS_FILE,
    CONTENT_MAP_FILE,
    FULL_GRAPH_FILE,
    FULL_INPUTS,
    ITEM_COUNTS_FILE,
    ITEM_EMBEDDINGS_FILE,
    ITEMS_FILE,
    MANIFEST,
    MEMORY_STATE,
    SLOT_AXIS,
    STEP_GRAPH_FILE,
    full_outputs,
    stage_files,
    stage_inputs,
    stage_outputs,
    state_names,
    step_inputs,
    step_outputs,
    write_manifest,
)
from export.graphs import (
    FullGraph,
    StepGraph,
    StepStage,
    attention_biases,
    from_graph_state,
    next_state,
    to_graph_state,
)
from export.staged_step import StagedStep
from export.states import EncoderStates

OPSET = 17
PARITY_TOL = 1e-4


# ---------------------------------------------------------------------- model directory


def load_model_dir(model_dir: Path) -> tuple[InterestEncoder, list[str | None], dict[str, Any]]:
    """(model in eval mode, item ids by model index with None at 0, training metrics).

    The layout is what ``interest train`` writes (encoder/train.py): config.json, model.pt,
    vocab.json ({"items": [...], "event_types": [...], "item_counts": [...]}), metrics.json.
    Anything missing or inconsistent raises UserError with a one-line reason.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} does not exist")
    for name in ("config.json", "model.pt", "vocab.json"):
        if not (model_dir / name).is_file():
            raise UserError(f"{model_dir} is not a trained model directory (no {name})")
    try:
        cfg = EncoderConfig.from_dict(_read_json(model_dir / "config.json"))
        model = InterestEncoder(cfg)
        weights = torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(weights)
    except UserError:
        raise
    except Exception as exc:  # torch.load raises several unrelated types on a bad file
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load the model in {model_dir}: {reason}") from None
    vocab = _read_json(model_dir / "vocab.json")
    items = vocab.get("items") if isinstance(vocab, dict) else vocab
    mpath = model_dir / "metrics.json"
    metrics = _read_json(mpath) if mpath.is_file() else {}
    if not isinstance(metrics, dict):
        metrics = {"metrics": metrics}
    return model.eval(), _normalise_items(items, cfg.n_items, model_dir), metrics


def load_item_counts(model_dir: Path, n_items: int) -> np.ndarray:
    """(n_items + 1,) int64 training events per item from vocab.json (encoder/popularity.py);
    UserError when the directory has none or a malformed list."""
    vocab = _read_json(Path(model_dir) / "vocab.json")
    try:
        counts = counts_from_vocab(vocab, n_items)
    except ValueError as exc:
        raise UserError(f"{model_dir}/vocab.json: {exc}") from None
    if counts is None:
        raise UserError(
            f"{model_dir}/vocab.json has no {VOCAB_COUNTS_KEY}: train the model again with"
            " `interest train` to export it"
        )
    return counts


def save_model_dir(
    model: InterestEncoder,
    items: list[str],
    out: Path,
    metrics: dict[str, Any] | None = None,
    counts: list[int] | None = None,
) -> Path:
    """Write a model directory in the layout ``interest train`` writes (for tests, benchmarks).
    ``counts``: training events per item, in ``items`` order (one each when not given)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2))
    torch.save(model.state_dict(), out / "model.pt")
    vocab = {
        "items": list(items),
        "event_types": list(EVENT_TYPES[: model.cfg.n_event_types]),
        VOCAB_COUNTS_KEY: list(counts) if counts is not None else [1] * len(items),
    }
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "metrics.json").write_text(json.dumps(metrics or {}, indent=2))
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None


def _normalise_items(items: Any, n_items: int, model_dir: Path) -> list[str | None]:
    """Item ids by model index with None at 0, from the n_items ids of vocab.json."""
    if isinstance(items, list) and len(items) == n_items:
        items = [None, *items]
    if not isinstance(items, list) or len(items) != n_items + 1:
        got = len(items) if isinstance(items, list) else type(items).__name__
        raise UserError(f"{model_dir}: vocab.json has {got} items, config says n_items={n_items}")
    ids = [None if i == 0 else str(x) for i, x in enumerate(items)]
    if any(x is None for x in ids[1:]) or len(set(ids[1:])) != n_items:
        raise UserError(f"{model_dir}: item vocabulary has missing or duplicate ids")
    return ids


# ---------------------------------------------------------------------- export


def _example_inputs(cfg: EncoderConfig, batch: int, length: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, cfg.n_items + 1, (batch, length), generator=g)
    items[0, : length // 2] = 0  # left padding in one row
    return {
        "items": items,
        "types": torch.randint(0, cfg.n_event_types, (batch, length), generator=g),
        "gaps": torch.randint(0, cfg.n_time_buckets, (batch, length), generator=g),
        "memory_in": torch.randn(batch, cfg.d_model, generator=g),
        "has_memory": torch.arange(batch) % 2 == 0,
    }


def export_onnx(model: InterestEncoder, out_dir: Path) -> dict[str, Any]:
    """Write full.onnx and step.onnx; return the state layout for the manifest.

    The wrappers are put in eval mode: torch.onnx.export restores the *wrapper's* training
    flag on every submodule afterwards, so a fresh (training) wrapper would switch the model's
    dropout back on for everything that runs after the export.
    """
    model.eval()
    cfg = model.cfg
    names = state_names(cfg.n_layers)
    outs = full_outputs(cfg.n_layers)
    step_in, step_out = step_inputs(cfg.n_layers), step_outputs(cfg.n_layers)
    batch_axis = {0: "batch"}
    full_ex = _example_inputs(cfg, 2, max(3, cfg.span + 1), seed=0)
    window_axes = {0: "batch", 1: "window"}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns about constant folding of dynamic slices and shapes
        # read as Python ints: expected, and the parity check below runs other shapes.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            FullGraph(model).eval(),
            tuple(full_ex[n] for n in FULL_INPUTS),
            str(out_dir / FULL_GRAPH_FILE),
            input_names=FULL_INPUTS,
            output_names=outs,
            dynamic_axes={
                **{n: window_axes for n in ("items", "types", "gaps")},
                **{n: batch_axis for n in ("memory_in", "has_memory", *outs)},
            },
            opset_version=OPSET,
            dynamo=False,
        )
        last = {k: full_ex[k][:, -1] for k in ("items", "types", "gaps")}
        step_graph = StepGraph(model).eval()
        torch.onnx.export(
            step_graph,
            (last["items"], last["types"], last["gaps"], *to_graph_state(model.init_state(2))),
            str(out_dir / STEP_GRAPH_FILE),
            input_names=step_in,
            output_names=step_out,
            dynamic_axes={n: batch_axis for n in (*step_in, *step_out)},
            opset_version=OPSET,
            dynamo=False,
        )
        stages = export_stages(step_graph, out_dir, last)
    np.save(out_dir / ATTENTION_BIAS_FILE, attention_biases(step_graph), allow_pickle=False)
    example = to_graph_state(model.init_state(1))
    return {
        "state": [
            {
                "name": n,
                "dtype": str(t.numpy().dtype),
                "shape": [-1, *t.shape[1:]],  # axis 0: user
                **({"slot_axis": SLOT_AXIS} if t.dim() > SLOT_AXIS else {}),
            }
            for n, t in zip(names, example, strict=True)
        ],
        "memory_state": MEMORY_STATE,
        "graphs": {
            "full": {"file": FULL_GRAPH_FILE, "inputs": FULL_INPUTS, "outputs": outs},
            "step": {
                "file": STEP_GRAPH_FILE,
                "inputs": step_in,
                "outputs": step_out,
                "requires": "every row has a real item (index >= 1)",
                "next_state": "caches are ring buffers: write each slot_ output into its cache"
                " at index ring on the slot_axis, then take out_memory and out_ring",
            },
            "stages": stages,
            "attention_bias": ATTENTION_BIAS_FILE,
        },
    }


def export_stages(
    step: StepGraph, out_dir: Path, event: dict[str, torch.Tensor]
) -> list[dict[str, Any]]:
    """Write step.onnx cut at its attention reads (``StepStage``), one graph per stage; return
    their manifest entries. Called inside export_onnx's no_grad and warning filters."""
    cfg = step.model.cfg
    batch = event["items"].shape[0]
    x = torch.randn(batch, cfg.d_model)
    y = torch.randn(batch, cfg.n_heads, cfg.d_model // cfg.n_heads + 1)
    examples = {"x": x, "y": y, "memory": torch.randn(batch, cfg.d_model), **event}
    entries = []
    for index, file in enumerate(stage_files(cfg.n_layers)):
        names_in = stage_inputs(index, cfg.n_layers)
        names_out = stage_outputs(index, cfg.n_layers)
        torch.onnx.export(
            StepStage(step, index).eval(),
            tuple(examples[n] for n in names_in),
            str(out_dir / file),
            input_names=names_in,
            output_names=names_out,
            dynamic_axes={n: {0: "batch"} for n in (*names_in, *names_out)},
            opset_version=OPSET,
            dynamo=False,
        )
        entries.append({"file": file, "inputs": names_in, "outputs": names_out})
    return entries


def check_parity(model: InterestEncoder, out_dir: Path) -> dict[str, float]:
    """Max abs difference ONNX Runtime (CPU) vs torch for every graph, on random input.

    A different batch and window than the export example, to catch frozen shapes; the
    references are the model's own state_from_window and step, not the export wrappers.
    """
    import onnxruntime as ort

    model.eval()
    cfg = model.cfg
    so = ort.SessionOptions()
    so.log_severity_level = 3
    cpu = ["CPUExecutionProvider"]
    full = ort.InferenceSession(str(out_dir / FULL_GRAPH_FILE), so, providers=cpu)
    step = ort.InferenceSession(str(out_dir / STEP_GRAPH_FILE), so, providers=cpu)
    ex = _example_inputs(cfg, 3, cfg.receptive_field + 3, seed=1)
    with torch.no_grad():
        full_diff, state = _full_parity(model, full, ex)
        event = (ex["items"][:, 0] % cfg.n_items + 1, ex["types"][:, 0], ex["gaps"][:, 0])
        ref_step = _model_step(model, state, event)
        step_diff = _step_parity(step, cfg, state, event, ref_step)
        # the same state with each user's ring turned (slot i moved to i + shift): same step
        turned = _turn_rings(state, cfg.span - 1)
        feeds = dict(zip(step_inputs(cfg.n_layers), [*_numpy(event), *turned], strict=True))
        step_diff = max(step_diff, _maxdiff(ref_step[0], step.run(None, feeds)[0]))
        staged = StagedStep.load(out_dir, stage_files(cfg.n_layers), so, cpu)
        staged_diff = _staged_parity(staged, cfg, turned, event, ref_step)
    return {
        "full_max_abs_diff": full_diff,
        "step_max_abs_diff": step_diff,
        "staged_step_max_abs_diff": staged_diff,
    }


def _full_parity(
    model: InterestEncoder, full: Any, ex: dict[str, torch.Tensor]
) -> tuple[float, list[np.ndarray]]:
    """full.onnx vs state_from_window, users with and without a persisted memory; returns the
    difference and full.onnx's state."""
    has = ex["has_memory"]
    win = (ex["items"], ex["types"], ex["gaps"])
    vec_m, st_m = model.state_from_window(*win, ex["memory_in"])
    vec_n, st_n = model.state_from_window(*win, None)
    ref_vec = torch.where(has[:, None], vec_m, vec_n)
    ref_state = [
        torch.where(has.view(-1, *[1] * (a.dim() - 1)), a, b)
        for a, b in zip(to_graph_state(st_m), to_graph_state(st_n), strict=True)
    ]
    got = full.run(None, {k: v.numpy() for k, v in ex.items()})
    diff = max(_maxdiff(r, g) for r, g in zip([ref_vec, *ref_state], got, strict=True))
    return diff, got[1:]


def _model_step(
    model: InterestEncoder, state: list[np.ndarray], event: tuple[torch.Tensor, ...]
) -> list[torch.Tensor]:
    """The reference step from a graph state: [vector, *graph state after the event]."""
    ref_vec, ref_next = model.step(from_graph_state([torch.from_numpy(a) for a in state]), *event)
    return [ref_vec, *to_graph_state(ref_next)]


def _step_parity(
    step: Any,
    cfg: EncoderConfig,
    state: list[np.ndarray],
    event: tuple[torch.Tensor, ...],
    ref_step: list[torch.Tensor],
) -> float:
    """step.onnx's outputs written by ``next_state`` vs the model's step."""
    feeds = dict(zip(step_inputs(cfg.n_layers), [*_numpy(event), *state], strict=True))
    vec, *outs = step.run(None, feeds)
    before = [torch.from_numpy(a) for a in state]
    after = next_state(before, [torch.from_numpy(a) for a in outs])
    got = [vec, *(t.numpy() for t in to_graph_state(from_graph_state(after)))]
    return max(_maxdiff(r, g) for r, g in zip(ref_step, got, strict=True))


def _staged_parity(
    staged: StagedStep,
    cfg: EncoderConfig,
    state: list[np.ndarray],
    event: tuple[torch.Tensor, ...],
    ref_step: list[torch.Tensor],
) -> float:
    """The worker's path (the stages with the attention in place, rows out of order) vs the
    model's step."""
    names = state_names(cfg.n_layers)
    *caches, memory, ring = state
    slab = EncoderStates(
        dict(zip(names, [*caches, memory.copy(), ring], strict=True)), np.zeros_like(memory)
    )
    rows = np.roll(np.arange(len(memory)), 1)
    staged.run(slab, rows, *(a[rows] for a in _numpy(event)))
    after = [torch.from_numpy(slab.arrays[n]) for n in names]
    got = [slab.vectors, *(t.numpy() for t in to_graph_state(from_graph_state(after)))]
    return max(_maxdiff(r, g) for r, g in zip(ref_step, got, strict=True))


def _turn_rings(state: list[np.ndarray], slots: int) -> list[np.ndarray]:
    """The same state with user b's caches rolled by b % slots + 1 and its ring moved along."""
    *caches, memory, _ = state
    shift = np.arange(len(memory)) % slots + 1
    turned = [
        np.stack([np.roll(c[b], int(shift[b]), axis=SLOT_AXIS - 1) for b in range(len(c))])
        for c in caches
    ]
    return [*turned, memory, shift % slots]


def _numpy(tensors: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    return [t.numpy() for t in tensors]


def _maxdiff(ref: torch.Tensor, got: np.ndarray) -> float:
    return float(np.max(np.abs(ref.numpy().astype(np.float64) - got.astype(np.float64))))


def write_content_map(model_dir: Path, d_model: int, out_dir: Path) -> dict[str, Any] | None:
    """The model directory's content map into the bundle; its manifest description, or None
    when the directory has none."""
    try:
        content_map: ContentMap | None = load_content_map(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            f"{model_dir}/{MODEL_DIR_FILE}: {exc}; fit it again with"
            f" `interest catalogue --model {model_dir}`"
        ) from None
    if content_map is None:
        return None
    if content_map.weights.shape[1] != d_model:
        raise UserError(
            f"{model_dir}/{MODEL_DIR_FILE} maps to {content_map.weights.shape[1]} dimensions, the"
            f" model has {d_model}: fit it again with `interest catalogue --model {model_dir}`"
        )
    np.save(out_dir / CONTENT_MAP_FILE, content_map.weights, allow_pickle=False)
    return {
        "encoder": content_map.encoder,
        "content_dim": content_map.content_dim,
        "alpha": content_map.alpha,
        "items": content_map.items,
        "cv_r2": round(content_map.cv_r2, 6),
        "scale": round(content_map.scale, 6),
    }


def export_bundle(model_dir: Path, out: Path) -> Path:
    """Export ``model_dir`` (written by ``interest train``) to a bundle directory ``out``.

    Writes into a temporary sibling directory and renames it at the end, so a failed export
    never leaves a half-written bundle where the worker looks. Returns ``out``.
    """
    model_dir, out = Path(model_dir), Path(out)
    model, item_ids, metrics = load_model_dir(model_dir)
    counts = load_item_counts(model_dir, model.cfg.n_items)
    replaceable = out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST).is_file())
    if out.exists() and not replaceable:
        raise UserError(f"{out} exists and is not a bundle; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        started = time.perf_counter()
        layout = export_onnx(model, tmp)
        parity = check_parity(model, tmp)
        if max(parity.values()) > PARITY_TOL:
            raise UserError(f"ONNX export does not match torch (max abs diff {parity})")
        (tmp / ITEMS_FILE).write_text(json.dumps(item_ids))
        emb = model.item_embeddings().detach().cpu().numpy().astype(np.float32)
        np.save(tmp / ITEM_EMBEDDINGS_FILE, emb, allow_pickle=False)
        np.save(tmp / ITEM_COUNTS_FILE, counts, allow_pickle=False)
        cfg = model.cfg
        content_map = write_content_map(model_dir, cfg.d_model, tmp)
        fields = {
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "export_seconds": round(time.perf_counter() - started, 3),
            "source_model": str(model_dir.resolve()),
            "config": cfg.to_dict(),
            "metrics": metrics,
            "content_map": content_map,
            "receptive_field": cfg.receptive_field,
            # type index order (encoder.features); a model trained before a type was added
            # has fewer rows
            "event_types": list(EVENT_TYPES[: cfg.n_event_types]),
            "d_model": cfg.d_model,
            "n_items": cfg.n_items,
            **layout,
            "parity": parity,
            "opset": OPSET,
            "torch_version": torch.__version__,
        }
        write_manifest(tmp, fields)
        # Swap by renames: the old bundle stays whole until the new one is in place.
        old = out.with_name(f".{out.name}.old-{tmp.name}") if out.exists() else None
        if old is not None:
            out.rename(old)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the worker may run as another user
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
