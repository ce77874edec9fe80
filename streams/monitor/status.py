"""A partition's health from its recent offsets, in the spirit of Burrow's evaluation rules.

Burrow judges a consumer by a sliding window of its committed offsets instead of a lag
threshold: lag alone cannot tell a worker that is busy catching up from one that is stuck. The
rules, over the last ``window`` samples of (committed offset, end offset), first match wins:

- ERR   the offsets could not be read, or the committed offset is past the end offset.
- OK    the lag was zero in some sample of the window (the worker caught up at least once).
- OK    the window is not full yet (too early to judge a non-zero lag).
- STOP  the committed offset did not move over the window, the lag is not zero, and no worker
        is consuming: the group has no members, or (where the broker does not tell the
        members) the offset has not moved for ``stop_after`` windows.
- STALL the committed offset did not move over the window and the lag is not zero, while the
        group has members: a worker owns the partition but makes no progress.
- WARN  the committed offset moved, but the lag grew in every interval of the window: the
        worker is falling behind.
- OK    otherwise: consuming, and keeping up or catching up.

Pure functions over samples: the monitor's collector feeds them; tests feed them directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

STATUSES = ("OK", "WARN", "STALL", "STOP", "ERR")
# How bad each status is, for a group's overall status (the worst of its partitions).
SEVERITY = {status: rank for rank, status in enumerate(STATUSES)}


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of a partition: when, and its offsets then (None: unknown)."""

    at_ms: int
    committed: int | None  # None: the group has committed nothing here
    end: int | None  # None: the end offset could not be read

    @property
    def lag(self) -> int | None:
        if self.end is None:
            return None
        return max(0, self.end - (self.committed or 0))


@dataclass(frozen=True, slots=True)
class Verdict:
    status: str  # one of STATUSES
    reason: str  # the rule that matched, for a person


def evaluate(
    history: Sequence[Sample], window: int, members: int | None, stop_after: int = 3
) -> Verdict:
    """The partition's status from its samples, oldest first (the rules: module docstring).

    ``members``: the group's members, None where the broker does not say.
    """
    if not history:
        return Verdict("ERR", "no reading yet")
    last = history[-1]
    if last.end is None:
        return Verdict("ERR", "the end offset could not be read")
    if last.committed is not None and last.committed > last.end:
        return Verdict("ERR", f"committed offset {last.committed} is past the end {last.end}")
    recent = history[-window:]
    lags = [sample.lag for sample in recent]
    if any(lag == 0 for lag in lags):
        return Verdict("OK", "the lag reached zero in the window")
    if len(recent) < window:
        return Verdict("OK", "the window is not full yet")
    if recent[0].committed == last.committed:
        return _not_moving(history, window, members, stop_after)
    if all(b is not None and a is not None and b > a for a, b in pairwise(lags)):
        return Verdict("WARN", "the offset moves but the lag grew in every interval")
    return Verdict("OK", "consuming")


def _not_moving(
    history: Sequence[Sample], window: int, members: int | None, stop_after: int
) -> Verdict:
    """STOP or STALL for a partition whose committed offset stood still over the window."""
    if members == 0:
        return Verdict("STOP", "no worker in the group; the offset did not move")
    if members is None and _unmoved_samples(history) >= stop_after * window:
        return Verdict("STOP", f"the offset has not moved for {stop_after} windows")
    return Verdict("STALL", "the offset did not move over the window with lag above zero")


def _unmoved_samples(history: Sequence[Sample]) -> int:
    """How many of the newest samples share the newest committed offset."""
    newest = history[-1].committed
    count = 0
    for sample in reversed(history):
        if sample.committed != newest:
            break
        count += 1
    return count


def worst(statuses: Sequence[str]) -> str:
    """A group's status: the worst of its partitions' (OK for none)."""
    return max(statuses, key=SEVERITY.__getitem__, default="OK")
