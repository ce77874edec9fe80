"""Event features shared by training and the streaming worker: event types and time-gap buckets.

Pure Python (math only, no torch, no numpy), so the worker can compute the exact inputs the
model was trained on without importing the training stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Index order is part of the model contract: a trained model's type embedding rows follow it,
# so a new type is only ever appended (a model trained before it has one row fewer, and is
# fed the default type for it: its config's n_event_types says how many it knows).
EVENT_TYPES: tuple[str, ...] = ("click", "purchase", "view", "add_to_cart", "favorite")
# SASRec-format data has no event type; every event gets this one.
DEFAULT_EVENT_TYPE = 0
# Bucket 0 means "gap unknown" (first event of a user, or data without timestamps).
UNKNOWN_GAP_BUCKET = 0
DEFAULT_TIME_BUCKETS = 32


def event_type_index(name: str) -> int:
    """Index of an event type name; raises ValueError for names outside EVENT_TYPES."""
    try:
        return EVENT_TYPES.index(name)
    except ValueError:
        raise ValueError(f"unknown event_type {name!r}, expected one of {EVENT_TYPES}") from None


def parse_event_types(text: str) -> tuple[str, ...]:
    """A comma-separated list of event type names (spaces ignored; empty: none), each checked
    against EVENT_TYPES; raises ValueError naming the bad one."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    for name in names:
        event_type_index(name)
    return names


def excluded_type_indices(names: Sequence[str] | None) -> frozenset[int] | None:
    """The seen-items rule as type indices for offline evaluation: None (every type) when the
    rule names every type, so the common case costs nothing extra."""
    if names is None or set(EVENT_TYPES) <= set(names):
        return None
    return frozenset(event_type_index(name) for name in names)


def time_gap_bucket(gap_seconds: float | None, n_buckets: int = DEFAULT_TIME_BUCKETS) -> int:
    """Log2-bucket of the seconds since the user's previous event.

    Why log buckets: gaps span seconds (same session) to months (returning user); what matters
    is the order of magnitude. None or negative (clock skew) -> 0 (unknown); 0..1 s -> 1;
    then one bucket per doubling, the last bucket absorbing everything longer.
    """
    if gap_seconds is None or gap_seconds < 0 or math.isnan(gap_seconds):
        return UNKNOWN_GAP_BUCKET
    return 1 + min(n_buckets - 2, int(math.log2(1.0 + gap_seconds)))


def window_gaps(timestamps_ms: Sequence[int], n_buckets: int, use_gaps: bool = True) -> list[int]:
    """The gap buckets of a window (oldest first) as the worker feeds them: the first event's
    is unknown (0), every other one measured from its predecessor in the window; all 0 for a
    model trained without timestamps."""
    gaps = [UNKNOWN_GAP_BUCKET] * len(timestamps_ms)
    for i in range(1, len(timestamps_ms) if use_gaps else 0):
        gaps[i] = time_gap_bucket((timestamps_ms[i] - timestamps_ms[i - 1]) / 1000, n_buckets)
    return gaps
