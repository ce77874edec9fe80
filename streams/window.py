"""Per-user rolling window: the last L events, optionally no older than a maximum age.

Pure logic. Idempotence lives here: a user's state remembers the highest offset applied from each
(topic, partition), so a replayed message (worker restart, rebalance) is recognised and skipped,
and an event_id already in the window (an app that retried a push) is not appended twice.
The age limit is measured against the newest event time, never the wall clock, so replaying a
log gives the same windows as the first run.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from streams.events import Event, Forget


class WindowEntry(msgspec.Struct, frozen=True, gc=False):
    """One event as the window keeps it; JSON as stored in Redis: {event_id, item_id,
    event_type, timestamp}.

    Why a msgspec Struct with gc=False: a worker caches ~200 of these per user for tens of
    thousands of users, millions of objects that CPython's cycle collector would rescan again
    and again if it tracked them. With only str and int fields an entry can never be part of a
    reference cycle, so it need not be tracked at all; reference counting still frees it.
    """

    event_id: str
    item_id: str
    event_type: str
    timestamp_ms: int = msgspec.field(name="timestamp")

    def to_json(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "item_id": self.item_id,
            "event_type": self.event_type,
            "timestamp": self.timestamp_ms,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WindowEntry:
        return cls(data["event_id"], data["item_id"], data["event_type"], int(data["timestamp"]))

    @classmethod
    def from_event(cls, event: Event) -> WindowEntry:
        return cls(event.event_id, event.item_id, event.event_type, event.timestamp_ms)


class ForgetMark(msgspec.Struct, frozen=True, gc=False):
    """The user's forget requests: those whose copies are still arriving, and the last few
    completed.

    Each input topic carries a copy of a request (streams/forget.py). Until a request's copy
    on a topic has arrived, the user's events from that topic were sent before the request:
    they are dropped, never applied to the history that starts after it. A request sent after
    another also stands for the earlier one's copy on each topic where its own arrives (both
    predate everything after it there), so a copy that never comes is closed by the next
    request. A late copy of a completed request (a retry, a producer's duplicate) is
    recognised by its id among ``done`` and changes nothing.
    """

    # (forget_id, topics whose copy arrived), oldest request first.
    pending: tuple[tuple[str, tuple[str, ...]], ...] = ()
    done: tuple[str, ...] = ()  # the last completed request ids, newest last


# Completed request ids a mark remembers, for late copies of them.
DONE_KEPT = 8


@dataclass(slots=True)
class UserState:
    """What the store keeps per user: the window (oldest first) and applied offsets."""

    window: list[WindowEntry] = field(default_factory=list)
    # "topic/partition" -> highest offset applied from it.
    offsets: dict[str, int] = field(default_factory=dict)
    # The window's event ids, built by the first `apply_event` and kept in step by it; None
    # until then. Why: a scan of the window's ids per event costs far more than keeping this
    # set, and a batch's copy of it. Not stored: rebuilt after a read. Left
    # out of equality: two states with the same window are equal whether it is built or not.
    event_ids: set[str] | None = field(default=None, compare=False, repr=False)
    forgetting: ForgetMark | None = None  # a forget whose copies have not all arrived

    def copy(self) -> UserState:
        """A state of its own, for a batch to change (and perhaps never write)."""
        ids = None if self.event_ids is None else self.event_ids.copy()
        return UserState(list(self.window), dict(self.offsets), ids, self.forgetting)

    def seen_items(self) -> set[str]:
        return {entry.item_id for entry in self.window}


@dataclass(frozen=True, slots=True)
class WindowPolicy:
    length: int
    max_age_ms: int | None = None
    # The topics a user's events come from: a forget request is applied in full once its copy
    # on each of them has arrived (`ForgetMark`).
    input_topics: tuple[str, ...] = ()


def offset_key(topic: str, partition: int) -> str:
    return f"{topic}/{partition}"


def is_applied(state: UserState, event: Event | Forget) -> bool:
    """True when this exact message was applied before (a replay)."""
    applied = state.offsets.get(offset_key(event.source.topic, event.source.partition))
    return applied is not None and event.source.offset <= applied


def trim(window: list[WindowEntry], policy: WindowPolicy) -> list[WindowEntry]:
    """Keep the newest `length` entries and drop those older than max age (event time)."""
    if len(window) > policy.length:  # else kept as it is: no copy of the window per event
        window = window[-policy.length :]
    if policy.max_age_ms is not None and window:
        newest = window[-1].timestamp_ms
        window = [e for e in window if newest - e.timestamp_ms <= policy.max_age_ms]
    return window


def apply_event(state: UserState, event: Event, policy: WindowPolicy) -> bool:
    """Apply one event in place; returns False when it was a replay or duplicate (no change).

    The window is kept in event-time order (ties in arrival order): clicks and purchases come
    from different topics, so one user's events can arrive slightly out of order.
    """
    if is_applied(state, event):
        return False
    state.offsets[offset_key(event.source.topic, event.source.partition)] = event.source.offset
    ids = state.event_ids
    if ids is None:
        ids = state.event_ids = {entry.event_id for entry in state.window}
    if event.event_id in ids:
        return False
    entry = WindowEntry.from_event(event)
    window = state.window
    if window and window[-1].timestamp_ms > entry.timestamp_ms:
        window.insert(bisect.bisect_right(window, entry.timestamp_ms, key=_timestamp), entry)
    else:
        window.append(entry)
    ids.add(entry.event_id)
    kept = trim(window, policy)
    # Both limits drop the oldest entries (the window is in time order): a prefix.
    for dropped in window[: len(window) - len(kept)]:
        ids.discard(dropped.event_id)
    state.window = kept
    return True


def _timestamp(entry: WindowEntry) -> int:
    return entry.timestamp_ms


def sent_before_forget(state: UserState, event: Event) -> bool:
    """True for an event from a topic where some pending forget request's copy has not
    arrived: it was sent before that request (`ForgetMark`)."""
    mark = state.forgetting
    return mark is not None and any(event.source.topic not in topics for _, topics in mark.pending)


def skip(state: UserState, event: Event) -> None:
    """Record an event as handled without applying it (dropped: sent before a forget), so that
    a replay of it is recognised too."""
    key = offset_key(event.source.topic, event.source.partition)
    state.offsets[key] = max(state.offsets.get(key, -1), event.source.offset)


def apply_forget(state: UserState, forget: Forget, input_topics: Sequence[str]) -> str:
    """Apply one copy of a forget request in place: "wiped" (the history is gone: a new
    request), "copy" (another copy of a request already applied) or "duplicate" (a replay).
    The offsets stay: they are the replay guard, not history."""
    if is_applied(state, forget):
        return "duplicate"
    source = forget.source
    state.offsets[offset_key(source.topic, source.partition)] = source.offset
    mark = state.forgetting or ForgetMark()
    known = forget.forget_id in mark.done or any(fid == forget.forget_id for fid, _ in mark.pending)
    pending = mark.pending if known else (*mark.pending, (forget.forget_id, ()))
    state.forgetting = _arrived(pending, mark.done, forget.forget_id, source.topic, input_topics)
    if known:
        return "copy"
    state.window = []
    state.event_ids = set()
    return "wiped"


def _arrived(
    pending: tuple[tuple[str, tuple[str, ...]], ...],
    done: tuple[str, ...],
    forget_id: str,
    topic: str,
    input_topics: Sequence[str],
) -> ForgetMark | None:
    """The mark after request ``forget_id``'s copy on ``topic``: that copy counts for the
    request and every earlier pending one; requests with every topic's copy move to done."""
    ids = [fid for fid, _ in pending]
    upto = ids.index(forget_id) if forget_id in ids else -1
    still: list[tuple[str, tuple[str, ...]]] = []
    finished = list(done)
    for i, (fid, topics) in enumerate(pending):
        seen = set(topics) | ({topic} if i <= upto else set())
        if seen >= set(input_topics):
            finished.append(fid)
        else:
            still.append((fid, tuple(sorted(seen))))
    return ForgetMark(tuple(still), tuple(finished[-DONE_KEPT:]))
