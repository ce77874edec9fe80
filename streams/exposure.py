"""The live popularity bias of what this worker recommends: coverage and long-tail share.

The recommender reports each batch's recommended items as model indices (``Exposure``); the
processor, once the batch is committed, counts them into the ``ExposureWindow`` of the model
that made them, which the worker's gauges read. The long tail is the bundle's, computed from
its training counts by encoder/popularity.py ``long_tail`` exactly as `interest evaluate
--report` computes it, so the live share and the report's are the same measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# An item the model's catalogue does not hold (model index -1 in ``Exposure.items``): it
# has no training events, so it counts as long tail, and it is outside coverage.
OUTSIDE = -1


@dataclass(frozen=True, eq=False)
class Catalogue:
    """The serving model's items as the exposure measures need them."""

    version: str
    long_tail: np.ndarray  # (n_items + 1,) bool, False at the padding

    @property
    def n_items(self) -> int:
        return len(self.long_tail) - 1


@dataclass(frozen=True, eq=False)
class Exposure:
    """The items one batch recommended: model indices, OUTSIDE for items not in the model."""

    catalogue: Catalogue
    items: np.ndarray  # (slots,) int64; 0 (padding) is no item and is skipped


class ExposureWindow:
    """The last ``size`` recommended item slots of one model: counts per item kept as slots
    enter and leave, so a batch costs its own slots, not the window's."""

    def __init__(self, catalogue: Catalogue, size: int) -> None:
        if size < 1:
            raise ValueError("the exposure window needs at least one slot")
        self.catalogue = catalogue
        n = catalogue.n_items
        # index n + 1 stands for OUTSIDE: long tail, not in the catalogue
        self._tail = np.append(catalogue.long_tail, True)
        self._shown = np.zeros(n + 2, np.int64)
        self._ring = np.zeros(size, np.int64)
        self._next = 0
        self._filled = 0

    def add(self, items: np.ndarray) -> tuple[int, int]:
        """Count a batch's recommended model indices in; returns its (head, tail) slots."""
        n = self.catalogue.n_items
        slots = np.asarray(items, dtype=np.int64)
        slots = slots[slots != 0]  # padding: no item was recommended there
        slots = np.where((slots >= 1) & (slots <= n), slots, n + 1)[-len(self._ring) :]
        positions = (self._next + np.arange(len(slots))) % len(self._ring)
        # Until the ring is full it fills from 0, so the positions that wrap round, the
        # last ones, are the only ones that already hold a slot.
        replaced = max(0, self._filled + len(slots) - len(self._ring))
        evicted = self._ring[positions[len(slots) - replaced :]]
        size = n + 2
        self._shown -= np.bincount(evicted, minlength=size)
        self._shown += np.bincount(slots, minlength=size)
        self._ring[positions] = slots
        self._next = (self._next + len(slots)) % len(self._ring)
        self._filled = min(len(self._ring), self._filled + len(slots))
        tail = int(self._tail[slots].sum())
        return len(slots) - tail, tail

    @property
    def slots(self) -> int:
        return self._filled

    def coverage(self) -> float:
        """Share of the catalogue recommended at least once in the window."""
        n = self.catalogue.n_items
        return float(np.count_nonzero(self._shown[1 : n + 1]) / n) if n else 0.0

    def long_tail_share(self) -> float:
        """Share of the window's slots that hold a long-tail item (or one outside the model)."""
        if not self._filled:
            return 0.0
        return float(self._shown[self._tail].sum() / self._filled)
