"""The worker's step on a slab of 6,040 cached users, side by side in one process:
``EncoderRuntime.step_rows`` (the step's stages, attention read in place) against what the
worker did before, gathering the rows, ``step_in_place`` (step.onnx) and writing them back.

    python bench/staged_step.py BUNDLE

Median ms per call by batch size (random rows; the two paths alternate).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.runtime import EncoderRuntime, EncoderStates

USERS = 6040
Event = tuple[np.ndarray, np.ndarray, np.ndarray]


def main() -> None:
    rt = EncoderRuntime.load(sys.argv[1])
    rng = np.random.default_rng(0)
    empty = rt.initial_state(1)
    slab = EncoderStates(
        {n: np.repeat(a, USERS, axis=0) for n, a in empty.arrays.items()},
        np.zeros((USERS, rt.d_model), np.float32),
    )
    for name in rt.ring_caches:  # filled slots with random keys and values
        cache = slab.arrays[name]
        cache[..., :-1] = 0.1 * rng.standard_normal(cache[..., :-1].shape, dtype=np.float32)

    def staged(rows: np.ndarray, event: Event) -> None:
        rt.step_rows(slab, rows, *event)

    def gathered(rows: np.ndarray, event: Event) -> None:
        batch = slab.take(rows)
        rt.step_in_place(batch, *event)
        for name, a in slab.arrays.items():
            a[rows] = batch.arrays[name]

    paths: dict[str, Callable[[np.ndarray, Event], None]] = {
        "staged": staged,
        "gather+step+write": gathered,
    }
    for size in (1, 16, 64, 128, 256, 1000):
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(max(20, 2000 // size)):
            rows = rng.choice(USERS, size, replace=False)
            zeros = np.zeros(size, np.int64)
            event = (rng.integers(1, rt.n_items + 1, size), zeros, zeros)
            for name, path in paths.items():
                started = time.perf_counter()
                path(rows, event)
                times[name].append(time.perf_counter() - started)
        print(
            f"batch {size:5d}: "
            + ", ".join(f"{name} {1000 * np.median(t):.3f} ms" for name, t in times.items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
