"""A micro-batch's stages as plain functions: no Kafka, no Redis, no event loop.

Stage 1 checks the messages (bad ones become dead letters) and updates each user's window
(`check_messages`, `apply_events`, gathered in `Applied`); stage 2 is the recommender, fed by
`model_batch`; stage 3, `finish`, makes the payloads, the online hit rate and the state to
write (`Prepared`). Each stage's result is frozen: later stages read it and never change it.
`streams/processor.py` runs these with the I/O around them, and stamps each result with the
seconds it measured (``seconds``, 0 as these functions return it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from streams.events import Event, Forget, Rejection, Source, validate
from streams.exposure import Exposure
from streams.messages import OutRecord, RawMessage
from streams.popularity import popularity_epoch
from streams.recommend import Batch, Recommendation, Request, Result, StoredModelState
from streams.recommend import recommendation_event as _payload
from streams.settings import Settings
from streams.store import FORGOTTEN, BatchRead, StoredUser, UserWrite, encode_offsets
from streams.window import (
    ForgetMark,
    UserState,
    WindowEntry,
    WindowPolicy,
    apply_event,
    apply_forget,
    is_applied,
    sent_before_forget,
    skip,
)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one batch did, in counts."""

    applied: int
    duplicates: int
    rejected: int
    recommendations: int
    touched_users: frozenset[str]


@dataclass(frozen=True, slots=True)
class Checked:
    """The batch's messages split into valid events and dead letters, in arrival order."""

    events: list[Event | Forget]  # events and control records (forget requests)
    dead_letters: list[OutRecord]
    rejected: Counter[tuple[str, str]]  # per (topic, reason code)


@dataclass(frozen=True, slots=True)
class WindowChanges:
    """What `apply_events` changed: for the recommender and for the state write."""

    requests: list[Request]  # one per applied event, in order
    new_items: list[tuple[str, int]]  # (item, timestamp) per applied event, for popularity
    new_sources: list[Source]  # where each of new_items' events came from, same order
    appended: dict[str, list[WindowEntry]]  # per user, entries added at the window's end
    rewritten: set[str]  # users whose window took an event out of time order
    touched: frozenset[str]  # users to write: a replay still advances their offsets
    # (topic, "applied" | "duplicate" | "forgotten": sent before a forget | "forget")
    outcomes: Counter[tuple[str, str]]
    duplicates: int
    # Users whose history a forget request wiped in this batch, in order; their requests are
    # the ones after it only (those before are answered by the tombstone instead).
    forgotten: tuple[str, ...] = ()
    # Users whose `ForgetMark` this batch changed, with the mark after it (None: all copies in).
    marks: Mapping[str, ForgetMark | None] = field(default_factory=dict)
    forget_ids: tuple[str, ...] = ()  # of the requests that wiped a user, for the log


@dataclass(frozen=True, slots=True)
class Applied:
    """Stage 1's result: windows updated, nothing output yet."""

    checked: Checked
    # Each touched user as stored before this batch, but for `state`, which is the batch's own
    # copy, updated by it (the same object as in `states`).
    users: Mapping[str, StoredUser]
    # Users whose state before this batch is an earlier, uncommitted batch's: the index of that
    # batch in the ``earlier`` sequence `apply_batch` was given (`carried_users`).
    carried_from: Mapping[str, int]
    states: Mapping[str, UserState]  # after this batch
    changes: WindowChanges
    prior_windows: Mapping[str, tuple[WindowEntry, ...]]
    # Per user: the offsets JSON before (as stored) and after this batch (as it will be).
    prior_signatures: Mapping[str, bytes]
    final_signatures: Mapping[str, bytes]
    popular: list[tuple[str, float]]  # best first, this batch's events included
    popularity_epoch_ms: int | None
    seconds: float = 0.0  # spent in stage 1

    def user_after(self, user_id: str) -> StoredUser:
        """The user as Redis will hold it once this batch is written: window and offsets
        (copies, for the next batch to change); the model state and last recommendation are
        stages 2 and 3's (`Recommended.model_after`, `Prepared.recs_after`)."""
        return StoredUser(self.states[user_id].copy(), raw_offsets=self.final_signatures[user_id])

    def popularity_epoch_after(self) -> int | None:
        """The popularity epoch once this batch is written (its write sets one if none)."""
        return popularity_epoch(self.popularity_epoch_ms, self.changes.new_items)


@dataclass(frozen=True, slots=True)
class Recommended:
    """Stage 2's result: the recommender's output and the model states it started from."""

    result: Result
    stored: Mapping[str, StoredModelState]  # per user, before this batch
    seconds: float  # spent in stage 2, not counting waits for the thread

    def model_after(self, user_id: str) -> StoredModelState:
        """The user's model state once this batch is written."""
        update = self.result.updates.get(user_id)
        if update is None:
            return self.stored[user_id]
        return StoredModelState(update.vector, update.memory, update.model_version)


@dataclass(frozen=True, slots=True)
class Prepared:
    """Stage 3's result: everything the commit publishes and writes."""

    result: BatchResult
    out: list[OutRecord]  # dead letters, then recommendations, in order
    writes: dict[str, UserWrite]
    new_items: list[tuple[str, int]]
    popularity_epoch_ms: int | None
    online: Counter[str]  # "events:<version>" / "hits:<version>" increments
    outcomes: Counter[tuple[str, str]]  # (topic, applied | duplicate | rejected)
    rejected: Counter[tuple[str, str]]  # dead letters per (topic, reason code)
    sources: Counter[str]  # recommendations per source
    requests: list[Request]
    last_recs: Mapping[str, list[str] | None]  # per user, after this batch
    forget_ids: tuple[str, ...]  # forget requests that wiped a user in this batch
    exposure: Exposure | None = None  # the recommended items as model indices
    # Where each new item and each online count came from: the replay guard of stores whose
    # shared counters are written apart from the users (Redis Cluster, streams/cluster_io.py).
    new_sources: list[Source] = field(default_factory=list)
    online_events: list[tuple[Source, str, bool]] = field(default_factory=list)
    seconds: float = 0.0  # spent in stages 1-3

    def recs_after(self, user_id: str) -> list[str] | None:
        """The user's last recommendation once this batch is written."""
        return self.last_recs.get(user_id)


def check_message(message: RawMessage, settings: Settings) -> Event | Rejection:
    """One message validated, its key included."""
    result = validate(
        message.value,
        message.source,
        max_id_length=settings.max_id_length,
        max_event_bytes=settings.max_event_bytes,
    )
    if isinstance(result, Event | Forget) and message.key != result.user_id.encode():
        # Keys route a user's events to one partition (and so one worker, in order); an
        # unkeyed or mis-keyed event could be applied by two workers at once.
        reason = "message has no key" if message.key is None else "message key"
        return Rejection(
            f"{reason} does not match user_id (the key must be the user_id)",
            message.source,
            message.value or b"",
            "key_mismatch",
        )
    return result


def check_messages(messages: Sequence[RawMessage], settings: Settings) -> Checked:
    """Valid events, and a dead letter for each message that is not one."""
    events: list[Event] = []
    dead_letters: list[OutRecord] = []
    rejected: Counter[tuple[str, str]] = Counter()
    for message in messages:
        checked = check_message(message, settings)
        if isinstance(checked, Rejection):
            rejected[(message.source.topic, checked.reason)] += 1
            record = orjson.dumps(checked.dlq_record(settings.dlq_raw_max_bytes))
            dead_letters.append(OutRecord(settings.topic_dlq, message.key, record))
        else:
            events.append(checked)
    return Checked(events, dead_letters, rejected)


def carried_users(events: Sequence[Event], earlier: Sequence[Applied]) -> dict[str, int]:
    """Per user of ``events`` that an earlier, uncommitted batch touched: the newest such
    batch's index in ``earlier`` (Redis does not hold what it leaves yet)."""
    newest = {uid: i for i, batch in enumerate(earlier) for uid in batch.states}
    return {event.user_id: newest[event.user_id] for event in events if event.user_id in newest}


def apply_batch(
    checked: Checked,
    read: BatchRead,
    earlier: Sequence[Applied],
    carried: Mapping[str, int],
    policy: WindowPolicy,
    rank_popular: Callable[[list[tuple[str, float]], list[tuple[str, int]], int | None], Any],
) -> Applied:
    """Stage 1 after the store's read: each user from Redis (``read``) or, where an earlier
    uncommitted batch touched it (``carried``: `carried_users`), from that batch; their
    windows updated; the popularity ranking with this batch's events (``rank_popular(stored,
    new items, epoch)``).

    Takes ``read.users`` over: their states become this batch's (updated in place)."""
    users = read.users
    for uid, index in carried.items():
        users[uid] = earlier[index].user_after(uid)
    epoch = read.popularity_epoch_ms
    if epoch is None and earlier:  # the first batches: an earlier one sets it
        epoch = earlier[-1].popularity_epoch_after()
    states = {uid: user.state for uid, user in users.items()}
    prior_windows = {uid: tuple(state.window) for uid, state in states.items()}
    changes = apply_events(checked.events, states, policy)
    # Stored offsets change with every applied event, whichever worker applied it.
    prior_signatures = {uid: user.raw_offsets or b"" for uid, user in users.items()}
    for uid in changes.forgotten:
        # After a forget the user starts from nothing: no stored model state, no last
        # recommendation, no window before, and a signature no cached state matches.
        users[uid] = StoredUser(states[uid], raw_offsets=users[uid].raw_offsets)
        prior_windows[uid] = ()
        prior_signatures[uid] = FORGOTTEN
    return Applied(
        checked=checked,
        users=users,
        carried_from=carried,
        states=states,
        changes=changes,
        prior_windows=prior_windows,
        prior_signatures=prior_signatures,
        final_signatures={uid: encode_offsets(state.offsets) for uid, state in states.items()},
        popular=rank_popular(read.popular, changes.new_items, epoch),
        popularity_epoch_ms=epoch,
    )


def apply_events(
    events: Sequence[Event | Forget], states: Mapping[str, UserState], policy: WindowPolicy
) -> WindowChanges:
    """Window updates and forgets in arrival order. Changes ``states`` in place: they are the
    batch's own copies, made for it by the store's read."""
    changes = _Changes()
    for event in events:
        state = states[event.user_id]
        changes.touched.add(event.user_id)
        if isinstance(event, Forget):
            _forget(changes, state, event, policy)
        elif sent_before_forget(state, event) and not is_applied(state, event):
            skip(state, event)
            changes.outcomes[(event.source.topic, "forgotten")] += 1
        elif apply_event(state, event, policy):
            _applied(changes, state, event)
        else:
            changes.duplicates += 1
            changes.outcomes[(event.source.topic, "duplicate")] += 1
    return changes.result()


@dataclass(slots=True)
class _Changes:
    """`WindowChanges` while `apply_events` builds it."""

    requests: list[Request] = field(default_factory=list)
    new_items: list[tuple[str, int]] = field(default_factory=list)
    new_sources: list[Source] = field(default_factory=list)
    appended: dict[str, list[WindowEntry]] = field(default_factory=dict)
    rewritten: set[str] = field(default_factory=set)
    touched: set[str] = field(default_factory=set)
    # Counted per batch and reported once: a labelled inc() per event costs.
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    duplicates: int = 0
    forgotten: list[str] = field(default_factory=list)
    marks: dict[str, ForgetMark | None] = field(default_factory=dict)
    forget_ids: list[str] = field(default_factory=list)

    def result(self) -> WindowChanges:
        return WindowChanges(
            self.requests,
            self.new_items,
            self.new_sources,
            self.appended,
            self.rewritten,
            frozenset(self.touched),
            self.outcomes,
            self.duplicates,
            tuple(self.forgotten),
            self.marks,
            tuple(self.forget_ids),
        )


def _applied(changes: _Changes, state: UserState, event: Event) -> None:
    changes.outcomes[(event.source.topic, "applied")] += 1
    window = state.window
    at_end = bool(window) and window[-1].event_id == event.event_id
    if at_end:
        changes.appended.setdefault(event.user_id, []).append(window[-1])
    else:  # out of time order: inserted, so the stored window is rewritten
        changes.rewritten.add(event.user_id)
    changes.requests.append(Request(event, tuple(window), at_end))
    changes.new_items.append((event.item_id, event.timestamp_ms))
    changes.new_sources.append(event.source)


def _forget(changes: _Changes, state: UserState, forget: Forget, policy: WindowPolicy) -> None:
    """Apply a forget request's copy. A new request wipes the window (rewritten as what comes
    after it) and drops the user's requests so far in this batch: their answer is the
    tombstone. Their items stay in the popularity counts, which are not personal data."""
    outcome = apply_forget(state, forget, policy.input_topics)
    topic, user_id = forget.source.topic, forget.user_id
    if outcome == "duplicate":
        changes.duplicates += 1
        changes.outcomes[(topic, "duplicate")] += 1
        return
    changes.outcomes[(topic, "forget")] += 1
    changes.marks[user_id] = state.forgetting
    if outcome == "wiped":
        changes.forgotten.append(user_id)
        changes.forget_ids.append(forget.forget_id)
        changes.requests = [r for r in changes.requests if r.event.user_id != user_id]
        changes.appended.pop(user_id, None)
        changes.rewritten.add(user_id)


def model_batch(applied: Applied, carried_models: Mapping[str, StoredModelState], k: int) -> Batch:
    """Stage 2's input. ``carried_models``: for each user in ``applied.carried_from``, the
    model state the earlier batch leaves (`Recommended.model_after`)."""
    stored = {
        uid: carried_models[uid]
        if uid in carried_models
        else StoredModelState(user.vector, user.memory, user.model_version)
        for uid, user in applied.users.items()
    }
    for uid in applied.changes.forgotten:  # whatever an earlier batch left
        stored[uid] = StoredModelState()
    return Batch(
        requests=applied.changes.requests,
        prior_windows=applied.prior_windows,
        stored=stored,
        prior_signatures=applied.prior_signatures,
        final_signatures=applied.final_signatures,
        popular=applied.popular,
        k=k,
        forgotten=frozenset(applied.changes.forgotten),
    )


def finish(
    applied: Applied,
    recommended: Recommended,
    carried_recs: Mapping[str, list[str] | None],
    topic: str,
) -> Prepared:
    """Stage 3: one recommendation record per applied event on ``topic``, the online hit
    rate, and each touched user's write. ``carried_recs``: for each user in
    ``applied.carried_from``, the last recommendation the earlier batch leaves."""
    last_recs = {uid: user.recs for uid, user in applied.users.items()} | dict(carried_recs)
    online: Counter[str] = Counter()
    online_events: list[tuple[Source, str, bool]] = []
    sources: Counter[str] = Counter()
    out = list(applied.checked.dead_letters)
    for uid in applied.changes.forgotten:
        last_recs[uid] = None
        # A tombstone: consumers drop the user's recommendations, and a compacted topic
        # deletes them. It goes before the batch's recommendations, which all come after the
        # forget for this user.
        out.append(OutRecord(topic, uid.encode(), None))
    requests = applied.changes.requests
    recommendations = recommended.result.recommendations
    for request, recommendation in zip(requests, recommendations, strict=True):
        event = request.event
        _count_hit(online, online_events, last_recs.get(event.user_id), event, recommendation)
        last_recs[event.user_id] = recommendation.item_ids  # not changed later: shared
        payload = orjson.dumps(_payload(event, recommendation))
        out.append(OutRecord(topic, event.user_id.encode(), payload))
        sources[recommendation.source] += 1
    changes = applied.changes
    outcomes = Counter(changes.outcomes)
    for (topic_, _), n in applied.checked.rejected.items():
        outcomes[(topic_, "rejected")] += n
    return Prepared(
        result=BatchResult(
            applied=len(requests),
            duplicates=changes.duplicates,
            rejected=len(applied.checked.dead_letters),
            recommendations=len(requests),
            touched_users=changes.touched,
        ),
        out=out,
        writes=user_writes(applied, recommended.result, last_recs),
        new_items=changes.new_items,
        new_sources=changes.new_sources,
        online_events=online_events,
        popularity_epoch_ms=applied.popularity_epoch_ms,
        online=online,
        outcomes=outcomes,
        rejected=applied.checked.rejected,
        sources=sources,
        requests=requests,
        last_recs=last_recs,
        forget_ids=changes.forget_ids,
        exposure=recommended.result.exposure,
    )


def _count_hit(
    online: Counter[str],
    online_events: list[tuple[Source, str, bool]],
    previous: list[str] | None,
    event: Event,
    recommendation: Recommendation,
) -> None:
    """Online quality: was this event among the items recommended just before it?"""
    if previous is None:
        return
    hit = event.item_id in previous
    online[f"events:{recommendation.model_version}"] += 1
    online[f"hits:{recommendation.model_version}"] += hit
    online_events.append((event.source, recommendation.model_version, hit))


def user_writes(
    applied: Applied, result: Result, last_recs: Mapping[str, list[str] | None]
) -> dict[str, UserWrite]:
    """Each touched user's state after the batch, as the store writes it."""
    changes = applied.changes
    forgotten = set(changes.forgotten)
    writes: dict[str, UserWrite] = {}
    for uid in changes.touched:
        update = result.updates.get(uid)
        writes[uid] = UserWrite(
            applied.states[uid],
            read_offsets=applied.users[uid].raw_offsets,
            offsets_json=applied.final_signatures[uid],
            new_entries=changes.appended.get(uid, ()),
            replace=uid in changes.rewritten,
            vector=update.vector if update else None,
            memory=update.memory if update else None,
            model_version=update.model_version if update else None,
            recs=last_recs.get(uid),
            wipe=uid in forgotten,
            mark_changed=uid in changes.marks,
        )
    return writes
