"""CPython's cycle collector tuned for a process that caches many objects per user.

Both the worker and its inference process (streams/inference_process.py) keep long-lived
per-user caches and allocate many short-lived objects per event.
"""

from __future__ import annotations

import gc

# Collect the youngest generation every 50,000 net allocations instead of 700 (see tune_gc).
GC_THRESHOLDS = (50_000, 10, 100)


def tune_gc() -> None:
    """Fewer, larger cyclic-GC passes, and none over what was loaded at startup.

    Why: a worker keeps many long-lived objects (per-user caches) and allocates many
    short-lived ones per event, and CPython's default thresholds (700, 10, 10) rescanned the
    long-lived ones over and over: 12 full collections of ~0.23 s each in one 30,000-event
    `bench/batch.py` run (counted with a `gc.callbacks` hook). Against `--default-gc` that
    bench gives 3,541-3,565 instead of 2,755-3,025 events/s (window entries, once most of
    those objects, are no longer tracked at all: streams/window.py). Reference counting still
    frees everything at once; the cycle collector only has to find cycles, which the hot path
    rarely makes. Startup objects (modules, the model) are frozen out of every pass.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
