"""Decayed popularity: each item's score is its events' weights, 2 ** ((t - epoch) / half-life).

Why weights that grow with time instead of scores that shrink: a write then only adds the new
events' weights (ZINCRBY) and never touches the other items, yet comparing two scores compares
exponentially decayed event counts, since every score is relative to the same epoch. The
weights grow without end, so the epoch moves forward (`Decay.rebase_epoch`, the store's rebase
script scales every stored score once) before they leave float range.

Pure arithmetic: the store sends what this module computes, and the pipeline ranks with it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

# Rebase once the newest weight passes 2 ** 256: far from overflow, rare enough to cost nothing.
REBASE_AFTER_HALF_LIVES = 256
# No single weight beyond 2 ** 1000, whatever an event's time: a float holds it.
MAX_WEIGHT_EXPONENT = 1000.0
# How far ahead of this worker's clock an event time is still believed.
MAX_CLOCK_SKEW_MS = 3_600_000


def popularity_epoch(
    epoch_ms: int | None, item_timestamps: Sequence[tuple[str, int]]
) -> int | None:
    """The epoch popularity weights are relative to: the stored one, else (the first write)
    the oldest new event's time; None while there is neither."""
    if epoch_ms is not None or not item_timestamps:
        return epoch_ms
    return min(ts for _, ts in item_timestamps)


def latest_event_time() -> int:
    """The newest event time popularity believes: now, plus a clock-skew allowance."""
    return int(time.time() * 1000) + MAX_CLOCK_SKEW_MS


@dataclass(frozen=True, slots=True)
class Decay:
    """The weights for one half-life; ranking and writing use the same one."""

    half_life_ms: float

    def weights(
        self, item_timestamps: Iterable[tuple[str, int]], epoch_ms: int
    ) -> Iterator[tuple[str, float]]:
        """(item, weight) of each event: 2 ** ((event time - epoch) / half-life).

        Event times are capped at the wall clock (plus a skew allowance): one event stamped
        next year (a client clock bug) must not make everything else weightless. The exponent
        is bounded too: an event far from the epoch must not overflow a float.
        """
        latest = latest_event_time()  # once per batch: time.time() per event showed up
        half_life = self.half_life_ms
        for item_id, ts in item_timestamps:
            exponent = (min(ts, latest) - epoch_ms) / half_life
            yield item_id, math.pow(2.0, min(exponent, MAX_WEIGHT_EXPONENT))

    def increments(
        self, item_timestamps: Iterable[tuple[str, int]], epoch_ms: int
    ) -> dict[str, float]:
        """Each item's summed weight: one ZINCRBY per item, not per event."""
        increments: dict[str, float] = {}
        for item_id, weight in self.weights(item_timestamps, epoch_ms):
            increments[item_id] = increments.get(item_id, 0.0) + weight
        return increments

    def merge(
        self,
        popular: list[tuple[str, float]],
        item_timestamps: list[tuple[str, int]],
        epoch_ms: int | None,
    ) -> list[tuple[str, float]]:
        """The stored ranking plus events not yet written, best first.

        Only used to rank; what is written is computed again from the events.
        """
        if not item_timestamps:
            return popular
        epoch = popularity_epoch(epoch_ms, item_timestamps)
        assert epoch is not None  # there are events
        scores = dict(popular)
        for item_id, weight in self.weights(item_timestamps, epoch):
            scores[item_id] = scores.get(item_id, 0.0) + weight
        return sorted(scores.items(), key=lambda pair: pair[1], reverse=True)

    def rebase_epoch(self, epoch_ms: int, item_timestamps: Sequence[tuple[str, int]]) -> int | None:
        """The epoch to move to before writing these events, or None while their weights are
        still small enough. The new epoch leaves the newest event one to two half-lives ahead."""
        if not item_timestamps:
            return None
        newest = min(max(ts for _, ts in item_timestamps), latest_event_time())
        half_lives = (newest - epoch_ms) / self.half_life_ms
        if half_lives <= REBASE_AFTER_HALF_LIVES:
            return None
        shift = math.floor(half_lives) - 1
        return int(epoch_ms + shift * self.half_life_ms)
