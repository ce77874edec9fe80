"""The encoder state of a batch of users, as the runtime keeps it: numpy arrays, user on axis 0.

The arrays are the graphs' state tensors by name (export/bundle_format.py lists them); the
runtime's graphs read and write them, the worker keeps a slab of them for its cached users.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from export.bundle_format import MEMORY_STATE


@dataclass
class EncoderStates:
    """Incremental encoder state for a batch of users: numpy arrays with the user on axis 0.

    ``arrays`` holds the graph's state tensors by name, as listed in the bundle manifest
    (``keys_<layer>``/``values_<layer>`` attention caches of the last span-1 events, ring
    buffers; ``memory`` the long-term memory; ``ring`` each user's oldest slot, where the next
    event goes); ``vectors`` is each user's latest interest vector (zeros before any event),
    kept so a skipped event can return it.
    """

    arrays: dict[str, np.ndarray]
    vectors: np.ndarray  # (B, d) float32

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.vectors.nbytes + sum(a.nbytes for a in self.arrays.values()))

    @property
    def memory(self) -> np.ndarray:
        """(B, d) long-term memory after each user's last event: persist it beside the window,
        and pass it back to ``EncoderRuntime.rebuild`` to restore the state exactly."""
        return self.arrays[MEMORY_STATE]

    @classmethod
    def stack(cls, states: Sequence[EncoderStates]) -> EncoderStates:
        if not states:
            raise ValueError("stack() needs at least one state")
        names = states[0].arrays.keys()
        return cls(
            arrays={n: np.concatenate([s.arrays[n] for s in states], axis=0) for n in names},
            vectors=np.concatenate([s.vectors for s in states], axis=0),
        )

    def take(self, rows: Sequence[int] | np.ndarray) -> EncoderStates:
        """A copy of some users' rows (fancy indexing copies, so no batch buffer is kept alive)."""
        idx = np.asarray(rows, dtype=np.int64)
        return EncoderStates(
            arrays={n: a[idx] for n, a in self.arrays.items()}, vectors=self.vectors[idx]
        )

    def split(self) -> list[EncoderStates]:
        """One independent batch-1 state per user, for a per-user cache."""
        return [self.take([i]) for i in range(len(self))]
