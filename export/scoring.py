"""Top-k items per user by dot product, seen items excluded, as one small ONNX Runtime graph.

Why a graph and not numpy: in numpy a micro-batch needs the scores matmul, a Python loop
masking each user's seen items, argpartition and a sort of the winners, much of it holding the
GIL the worker's event loop needs; ONNX Runtime's MatMul + ScatterElements + TopK does the same
in one call, off the GIL, on the same device as the encoder. Plain reference:
``top_k_reference`` below; tests/export/test_scoring.py compares the two.

    vectors (B,d) float32, exclude (B,L) int64 (padded with 0), k (1,) int64
      -> scores = vectors @ items.T (+ bias, the popularity penalty when one is set: a
         column of the table, with a 1 appended to each vector); scores[b, exclude[b]] =
         -inf; TopK(scores, k)
      -> values (B,k) float32, indices (B,k) int64, best first, ties to the lower index
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

PADDING = 0
OPSET = 17
IR_VERSION = 8  # what onnxruntime >= 1.20 reads, whichever onnx version built the graph


def scoring_graph(item_embeddings: np.ndarray, bias: np.ndarray | None = None) -> bytes:
    """The serialized graph; the (n_items+1, d) table is baked in as a constant. An optional
    (n_items+1,) score bias becomes one more row of the table, and the caller appends a 1 to
    each vector (``TopKScorer``): the bias rides in the matrix product instead of a pass of
    its own over the (B, n_items+1) scores."""
    table = np.asarray(item_embeddings, dtype=np.float32)
    if bias is not None:
        if bias.shape != (table.shape[0],):
            raise ValueError(f"bias is {bias.shape}, not one value per item row")
        table = np.concatenate([table, np.asarray(bias, np.float32)[:, None]], axis=1)
    d = table.shape[1]
    items_t = numpy_helper.from_array(np.ascontiguousarray(table.T), "items_t")  # (d, n)
    minus_inf = helper.make_tensor("minus_inf", TensorProto.FLOAT, [1], [float("-inf")])
    nodes = [helper.make_node("MatMul", ["vectors", "items_t"], ["scores"])]
    nodes += [
        helper.make_node("Shape", ["exclude"], ["exclude_shape"]),
        helper.make_node("ConstantOfShape", ["exclude_shape"], ["blocked"], value=minus_inf),
        helper.make_node("ScatterElements", ["scores", "exclude", "blocked"], ["masked"], axis=1),
        helper.make_node(
            "TopK", ["masked", "k"], ["values", "indices"], axis=1, largest=1, sorted=1
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "top_k",
        inputs=[
            helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["batch", d]),
            helper.make_tensor_value_info("exclude", TensorProto.INT64, ["batch", "seen"]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        ],
        outputs=[
            helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", "k"]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", "k"]),
        ],
        initializer=[items_t],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def exclusion_matrix(
    exclude: Sequence[Sequence[int] | np.ndarray] | np.ndarray | None, batch: int, n: int
) -> np.ndarray:
    """(B, 1 + longest list) int64: padding first, then each user's indices; out-of-range
    indices (UNKNOWN = -1, stale ids) become padding, which is excluded anyway.

    ``exclude`` is one list per user, or a (B, W) integer matrix whose rows are those lists
    padded with 0 (padding is excluded anyway): the worker builds that directly.
    """
    if exclude is None:
        return np.zeros((batch, 1), np.int64)
    if len(exclude) != batch:
        raise ValueError("exclude needs one list of item indices per user")
    if isinstance(exclude, np.ndarray) and exclude.ndim == 2:
        out = np.zeros((batch, 1 + exclude.shape[1]), np.int64)
        out[:, 1:] = np.where((exclude >= 0) & (exclude < n), exclude, PADDING)
        return out
    rows = [np.asarray(seen, dtype=np.int64).reshape(-1) for seen in exclude]
    out = np.zeros((batch, 1 + max((len(r) for r in rows), default=0)), np.int64)
    for b, row in enumerate(rows):
        out[b, 1 : 1 + len(row)] = np.where((row >= 0) & (row < n), row, PADDING)
    return out


class TopKScorer:
    """One session per bundle; thread-safe like every ONNX Runtime session."""

    def __init__(
        self,
        item_embeddings: np.ndarray,
        options: ort.SessionOptions | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        bias: np.ndarray | None = None,
    ) -> None:
        self.n, self.d = item_embeddings.shape
        self._with_bias = bias is not None
        self.session = ort.InferenceSession(
            scoring_graph(item_embeddings, bias), options, providers=list(providers)
        )

    def top_k(
        self,
        vectors: np.ndarray,
        k: int,
        exclude: Sequence[Sequence[int] | np.ndarray] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(indices (B,k') int64, scores (B,k') float32), k' = min(k, n_items + 1), best first;
        where fewer than k' items remain, the tail has index 0 and score -inf."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.d)
        batch = vectors.shape[0]
        blocked = exclusion_matrix(exclude, batch, self.n)
        k = max(0, min(k, self.n))
        if batch == 0 or k == 0:
            return np.zeros((batch, k), np.int64), np.zeros((batch, k), np.float32)
        if self._with_bias:  # the 1 that multiplies the bias row of the table
            vectors = np.concatenate([vectors, np.ones((batch, 1), np.float32)], axis=1)
        values, indices = self.session.run(
            None, {"vectors": vectors, "exclude": blocked, "k": np.array([k], np.int64)}
        )
        indices[~np.isfinite(values)] = PADDING
        return indices, values


def top_k_reference(
    scores: np.ndarray, k: int, exclude: Sequence[Sequence[int]] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Plain reference for top_k: sort every item, walk the list, skip masked ones."""
    out_i, out_s = [], []
    for b, row in enumerate(np.asarray(scores, dtype=np.float32)):
        banned = {PADDING} | {int(x) for x in (exclude[b] if exclude is not None else [])}
        ranked = [int(j) for j in np.argsort(-row, kind="stable") if int(j) not in banned][:k]
        pad = k - len(ranked)
        out_i.append(ranked + [PADDING] * pad)
        out_s.append([float(row[j]) for j in ranked] + [-np.inf] * pad)
    return np.array(out_i, dtype=np.int64), np.array(out_s, dtype=np.float32)
