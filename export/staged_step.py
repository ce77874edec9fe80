"""The worker's step: step.onnx cut at its attention reads, the attention run in place.

The stages (export/graphs.py's StepStage, one ONNX graph each) hold the dense work and see the
events alone; between them the numba kernel (export/slab_attention.py) reads and writes each
user's caches where they lie in the slab of cached users, so no user's state is gathered into a
batch and scattered back. Reference: step.onnx (``EncoderRuntime.step_in_place``), compared in
tests/export/test_parity.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.bundle_format import (
    ATTENTION_BIAS_FILE,
    MEMORY_STATE,
    RING_STATE,
    SLOT_AXIS,
    BundleError,
)
from export.slab_attention import attend_in_place
from export.states import EncoderStates


class StagedStep:
    """The stage sessions and the per-layer attention biases of one bundle."""

    def __init__(self, stages: list[ort.InferenceSession], attention_bias: np.ndarray) -> None:
        if attention_bias.shape[0] != len(stages) - 1:
            raise ValueError(f"{len(stages)} stages for {attention_bias.shape[0]} layers")
        self.stages = stages
        self.stage_inputs = [[i.name for i in stage.get_inputs()] for stage in stages]
        self.attention_bias = attention_bias  # (n_layers, span, H)

    @classmethod
    def load(
        cls,
        path: Path,
        stage_files: Sequence[str],
        so: ort.SessionOptions,
        providers: Sequence[str],
    ) -> StagedStep:
        bias = np.load(path / ATTENTION_BIAS_FILE, allow_pickle=False)
        if bias.dtype != np.float32 or bias.ndim != 3 or bias.shape[0] != len(stage_files) - 1:
            raise BundleError(
                f"{path}: {ATTENTION_BIAS_FILE} is {bias.dtype} {bias.shape}"
                f" for {len(stage_files)} step stages"
            )
        stages = [ort.InferenceSession(str(path / f), so, providers=providers) for f in stage_files]
        return cls(stages, bias)

    def run(
        self,
        states: EncoderStates,
        rows: np.ndarray,
        items: np.ndarray,
        types: np.ndarray,
        gaps: np.ndarray,
    ) -> np.ndarray:
        """One event for each of ``rows`` (int64, no repeats; items known), in place in
        ``states`` (caches ``keys_<i>``/``values_<i>``, ``memory``, ``ring``, vectors).
        Returns the vectors (len(rows), d)."""
        arrays = states.arrays
        ring = arrays[RING_STATE]
        n_layers = len(self.stages) - 1
        feeds = {
            "items": items,
            "types": np.asarray(types, dtype=np.int64),
            "gaps": np.asarray(gaps, dtype=np.int64),
        }
        x, query, key, value = self._run(0, feeds)
        attended = np.empty_like(query)
        for layer in range(n_layers):
            keys, values = arrays[f"keys_{layer}"], arrays[f"values_{layer}"]
            bias = self.attention_bias[layer]
            attend_in_place(query, key, value, keys, values, rows, ring, bias, attended)
            feeds.update(x=x, y=attended)
            if layer + 1 < n_layers:
                x, query, key, value = self._run(layer + 1, feeds)
        feeds["memory"] = arrays[MEMORY_STATE][rows]
        vector, memory = self._run(n_layers, feeds)
        arrays[MEMORY_STATE][rows] = memory
        ring[rows] = (ring[rows] + 1) % arrays["keys_0"].shape[SLOT_AXIS]
        states.vectors[rows] = vector
        return vector

    def _run(self, index: int, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one stage on the feeds it takes (the exporter drops unused inputs)."""
        names = self.stage_inputs[index]
        return self.stages[index].run(None, {name: feeds[name] for name in names})
