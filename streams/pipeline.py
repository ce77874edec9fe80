"""Micro-batches, end to end, as plain async code the Faust agent calls.

One batch: validate -> read state (1 Redis round trip) -> window update -> recommend ->
payloads -> publish DLQ and recommendations (wait for delivery) -> write state (1 atomic Redis
round trip). `BatchProcessor` has these as stages; `BatchPipeline` keeps several batches in
flight, a stage apart.

Ordering gives the delivery guarantees: state is written only after the batch's output is
delivered, and offsets are committed (by Faust, once the batch's messages are acked after its
state write) only after the state write. A crash anywhere replays the batch: already-applied
messages are recognised by their offsets and skipped, and recommendation ids are deterministic,
so consumers can dedupe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

import msgspec
import orjson
from aiokafka.errors import KafkaError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streams import metrics
from streams.events import Event, Rejection, Source, validate
from streams.recommend import (
    Batch,
    Recommender,
    Request,
    Result,
    StoredModelState,
    recommendation_event,
)
from streams.settings import Settings
from streams.store import (
    StaleStateError,
    StateStore,
    StoredUser,
    UserWrite,
    encode_offsets,
    popularity_epoch,
)
from streams.window import (
    UserState,
    WindowEntry,
    WindowPolicy,
    apply_event,
)

log = logging.getLogger(__name__)


class RawMessage(msgspec.Struct, frozen=True, gc=False):
    key: bytes | None
    value: bytes | None
    source: Source


class OutRecord(msgspec.Struct, frozen=True, gc=False):
    topic: str
    key: bytes | None
    value: bytes


class Publisher(Protocol):
    async def publish(self, records: Sequence[OutRecord]) -> None:
        """Send all records and return once the broker acknowledged every one."""


@dataclass(slots=True)
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    recommendations: int = 0
    touched_users: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Applied:
    requests: list[Request] = field(default_factory=list)
    new_items: list[tuple[str, int]] = field(default_factory=list)  # (item, timestamp)
    appended: dict[str, list[WindowEntry]] = field(default_factory=dict)
    rewritten: set[str] = field(default_factory=set)


@dataclass(slots=True)
class AppliedBatch:
    """A batch after stage 1 (`BatchProcessor.apply`): windows updated, nothing output yet."""

    result: BatchResult
    out: list[OutRecord]  # dead letters so far
    users: dict[str, StoredUser]  # each touched user as before this batch
    # Users whose state before this batch is what an earlier, uncommitted batch leaves;
    # their model state and last recommendation are that batch's, resolved in stages 2 and 3.
    from_earlier: dict[str, AppliedBatch]
    states: dict[str, UserState]  # after this batch
    changes: _Applied
    outcomes: Counter[tuple[str, str]]
    prior_windows: dict[str, tuple[WindowEntry, ...]]
    # Per user: the offsets JSON before (as stored) and after this batch (as it will be).
    prior_signatures: dict[str, bytes]
    final_signatures: dict[str, bytes]
    popular: list[tuple[str, float]]
    popularity_epoch_ms: int | None
    seconds: float  # spent in this batch's stages so far
    recommended: Result | None = None  # after stage 2
    last_recs: dict[str, list[str] | None] | None = None  # after stage 3

    def user_after(self, user_id: str) -> StoredUser:
        """The user as Redis will hold it once this batch is written: window and offsets
        (copies, for the next batch to change); model state and recs follow later."""
        state = self.states[user_id]
        return StoredUser(
            state.copy(),
            raw_offsets=self.final_signatures[user_id],
        )

    def popularity_epoch_after(self) -> int | None:
        """The popularity epoch once this batch is written (its write sets one if none)."""
        return popularity_epoch(self.popularity_epoch_ms, self.changes.new_items)

    def model_after(self, user_id: str) -> tuple[bytes | None, bytes | None, str | None]:
        """(vector, memory, model_version) after this batch; needs stage 2 done."""
        assert self.recommended is not None, "stage 2 of the earlier batch is not done"
        update = self.recommended.updates.get(user_id)
        if update is not None:
            return update.vector, update.memory, update.model_version
        user = self.users[user_id]
        return user.vector, user.memory, user.model_version

    def recs_after(self, user_id: str) -> list[str] | None:
        """The user's last recommendation after this batch; needs stage 3 done."""
        assert self.last_recs is not None, "stage 3 of the earlier batch is not done"
        return self.last_recs.get(user_id)


@dataclass(slots=True)
class PreparedBatch:
    """A batch computed but not yet output: what `BatchProcessor.commit` publishes and writes."""

    result: BatchResult
    out: list[OutRecord]  # dead letters and recommendations, in order
    writes: dict[str, UserWrite]
    new_items: list[tuple[str, int]]
    popularity_epoch_ms: int | None
    online: Counter[str]
    outcomes: Counter[tuple[str, str]]
    sources: Counter[str]
    requests: list[Request]
    seconds: float  # spent in the stages before the commit


def _dumps(payload: object) -> bytes:
    return orjson.dumps(payload)


class BatchProcessor:
    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        recommender: Recommender,
        publisher: Publisher,
        executor: Executor | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        # Swapped between batches by a model rollout (see streams/model_watch.py).
        self.recommender = recommender
        self.publisher = publisher
        self.executor = executor
        max_age = settings.window_max_age_seconds
        self.policy = WindowPolicy(
            settings.window_length, int(max_age * 1000) if max_age is not None else None
        )
        self._inference = asyncio.Lock()  # one recommend call at a time

    def _validate(self, message: RawMessage) -> Event | Rejection:
        result = validate(
            message.value,
            message.source,
            max_id_length=self.settings.max_id_length,
            max_event_bytes=self.settings.max_event_bytes,
        )
        if isinstance(result, Event) and message.key != result.user_id.encode():
            # Keys route a user's events to one partition (and so one worker, in order); an
            # unkeyed or mis-keyed event could be applied by two workers at once.
            reason = "message has no key" if message.key is None else "message key"
            return Rejection(
                f"{reason} does not match user_id (the key must be the user_id)",
                message.source,
                message.value,
            )
        return result

    def _apply(
        self,
        events: Sequence[Event],
        states: dict[str, UserState],
        result: BatchResult,
        outcomes: Counter[tuple[str, str]],
    ) -> _Applied:
        """Window updates in arrival order; what changed, for the recommender and the write."""
        applied = _Applied()
        for event in events:
            state = states[event.user_id]
            # A replay still advances offsets, so a duplicate's user is written too.
            result.touched_users.add(event.user_id)
            if not apply_event(state, event, self.policy):
                result.duplicates += 1
                outcomes[(event.source.topic, "duplicate")] += 1
                continue
            result.applied += 1
            outcomes[(event.source.topic, "applied")] += 1
            appended = bool(state.window) and state.window[-1].event_id == event.event_id
            if appended:
                applied.appended.setdefault(event.user_id, []).append(state.window[-1])
            else:  # out of time order: inserted, so the stored window is rewritten
                applied.rewritten.add(event.user_id)
            applied.requests.append(Request(event, tuple(state.window), appended))
            applied.new_items.append((event.item_id, event.timestamp_ms))
        return applied

    async def process(self, messages: Sequence[RawMessage]) -> BatchResult:
        """The whole batch, one stage after the other, then return."""
        applied = await self.apply(messages)
        recommended = await self.recommend(applied)
        prepared = self.finish(applied, recommended)
        await self.commit(prepared)
        return prepared.result

    async def apply(
        self, messages: Sequence[RawMessage], earlier: Sequence[AppliedBatch] = ()
    ) -> AppliedBatch:
        """Stage 1, on the event loop: validate, read the users' state, update their windows.

        ``earlier``: batches applied but not yet committed, oldest first (`BatchPipeline`).
        Their users start from what those batches leave, not from Redis, which does not hold
        it yet; the popularity ranking still comes from Redis, so it may miss their events.
        """
        started = time.perf_counter()
        result = BatchResult()
        # Metrics are counted per batch and reported once: a labelled inc() per event costs.
        outcomes: Counter[tuple[str, str]] = Counter()
        events: list[Event] = []
        out: list[OutRecord] = []
        for message in messages:
            checked = self._validate(message)
            if isinstance(checked, Rejection):
                result.rejected += 1
                outcomes[(message.source.topic, "rejected")] += 1
                record = checked.dlq_record(self.settings.dlq_raw_max_bytes)
                out.append(OutRecord(self.settings.topic_dlq, message.key, _dumps(record)))
            else:
                events.append(checked)

        settings = self.settings
        pending = {uid: batch for batch in earlier for uid in batch.states}  # newest wins
        read = await self.store.read_batch(
            (event.user_id for event in events if event.user_id not in pending),
            popular_n=settings.top_k + settings.window_length,
        )
        users = read.users
        from_earlier: dict[str, AppliedBatch] = {}
        for event in events:
            source = pending.get(event.user_id)
            if source is not None and event.user_id not in users:
                users[event.user_id] = source.user_after(event.user_id)
                from_earlier[event.user_id] = source
        epoch = read.popularity_epoch_ms
        if epoch is None and earlier:  # the first batches: an earlier one sets it
            epoch = earlier[-1].popularity_epoch_after()
        states: dict[str, UserState] = {uid: user.state for uid, user in users.items()}
        prior_windows = {uid: tuple(state.window) for uid, state in states.items()}
        applied = self._apply(events, states, result, outcomes)
        return AppliedBatch(
            result=result,
            out=out,
            users=users,
            from_earlier=from_earlier,
            states=states,
            changes=applied,
            outcomes=outcomes,
            prior_windows=prior_windows,
            # Stored offsets change with every applied event, whichever worker applied it.
            prior_signatures={uid: user.raw_offsets or b"" for uid, user in users.items()},
            final_signatures={uid: encode_offsets(states[uid].offsets) for uid in states},
            popular=self.store.merge_popularity(read.popular, applied.new_items, epoch),
            popularity_epoch_ms=epoch,
            seconds=_observe("apply", started),
        )

    async def recommend(self, applied: AppliedBatch) -> Result:
        """Stage 2, in the executor thread: the recommender over the batch's requests.

        Users taken from an earlier batch need that batch's stage 2 done first (their model
        state is its output); recommendations never run concurrently (the encoder's state
        cache is not thread-safe).
        """
        started = time.perf_counter()
        for user_id, source in applied.from_earlier.items():
            user = applied.users[user_id]
            user.vector, user.memory, user.model_version = source.model_after(user_id)
        batch = Batch(
            requests=applied.changes.requests,
            prior_windows=applied.prior_windows,
            stored={
                uid: StoredModelState(user.vector, user.memory, user.model_version)
                for uid, user in applied.users.items()
            },
            prior_signatures=applied.prior_signatures,
            final_signatures=applied.final_signatures,
            popular=applied.popular,
            k=self.settings.top_k,
        )
        recommender = self.recommender
        preparing = time.perf_counter() - started
        async with self._inference:
            # Inference is CPU work: run it in a thread so the event loop keeps serving Kafka.
            recommended, computing = await asyncio.get_running_loop().run_in_executor(
                self.executor, _timed_recommend, recommender, batch
            )
        applied.recommended = recommended
        # Not the waits for the lock or the thread (the batch before may hold them).
        applied.seconds += preparing + computing
        return recommended

    def finish(self, applied: AppliedBatch, recommended: Result) -> PreparedBatch:
        """Stage 3: payloads, online hit rate and the state to write. Pure Python, no I/O
        (`BatchPipeline` runs it in the executor thread, beside the next batch's stage 1).

        Users taken from an earlier batch need that batch's stage 3 done first (their last
        recommendation is its output)."""
        started = time.perf_counter()
        settings = self.settings
        for user_id, source in applied.from_earlier.items():
            applied.users[user_id].recs = source.recs_after(user_id)
        applied.from_earlier = {}  # resolved: no chain of batches kept alive
        users, states, requests = applied.users, applied.states, applied.changes.requests
        last_recs = {uid: user.recs for uid, user in users.items()}
        online: Counter[str] = Counter()
        sources: Counter[str] = Counter()
        out = applied.out
        for request, recommendation in zip(requests, recommended.recommendations, strict=True):
            event = request.event
            previous = last_recs.get(event.user_id)
            if previous is not None:
                # Online quality: was this event among the items recommended just before it?
                online[f"events:{recommendation.model_version}"] += 1
                online[f"hits:{recommendation.model_version}"] += event.item_id in previous
            last_recs[event.user_id] = recommendation.item_ids  # not changed later: shared
            payload = recommendation_event(event, recommendation)
            out.append(
                OutRecord(settings.topic_recommendations, event.user_id.encode(), _dumps(payload))
            )
            sources[recommendation.source] += 1
        applied.result.recommendations = len(requests)
        applied.last_recs = last_recs

        writes: dict[str, UserWrite] = {}
        for uid in applied.result.touched_users:
            update = recommended.updates.get(uid)
            writes[uid] = UserWrite(
                states[uid],
                read_offsets=users[uid].raw_offsets,
                offsets_json=applied.final_signatures[uid],
                new_entries=applied.changes.appended.get(uid, ()),
                replace=uid in applied.changes.rewritten,
                vector=update.vector if update else None,
                memory=update.memory if update else None,
                model_version=update.model_version if update else None,
                recs=last_recs.get(uid),
            )
        return PreparedBatch(
            result=applied.result,
            out=out,
            writes=writes,
            new_items=applied.changes.new_items,
            popularity_epoch_ms=applied.popularity_epoch_ms,
            online=online,
            outcomes=applied.outcomes,
            sources=sources,
            requests=requests,
            seconds=applied.seconds + _observe("finish", started),
        )

    async def commit(self, prepared: PreparedBatch) -> None:
        """Publish the batch's records (wait for the broker's acks), then write its state in
        one atomic script. Safe to retry; raises StaleStateError when another writer changed
        one of its users since it was read (prepare it again then)."""
        started = time.perf_counter()
        await self.publisher.publish(prepared.out)
        _observe("publish", started)
        writing = time.perf_counter()
        await self.store.write_batch(
            prepared.writes, prepared.new_items, prepared.popularity_epoch_ms, prepared.online
        )
        _observe("write", writing)
        # Only once the batch has succeeded (a retried batch is counted once).
        _report(prepared.outcomes, prepared.sources, prepared.online, prepared.requests)
        metrics.BATCH_SECONDS.observe(prepared.seconds + time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(prepared.requests) + prepared.result.rejected)


def _timed_recommend(recommender: Recommender, batch: Batch) -> tuple[Result, float]:
    """The recommender's call and its seconds, timed in the thread that runs it (not its wait
    for the thread, which may still be finishing the batch before)."""
    started = time.perf_counter()
    result = recommender.recommend(batch)
    return result, _observe("recommend", started)


def _observe(stage: str, started: float) -> float:
    """Record a stage's duration until now (``interest_stage_seconds``) and return it."""
    seconds = time.perf_counter() - started
    metrics.STAGE_SECONDS.labels(stage).observe(seconds)
    return seconds


def _report(
    outcomes: Counter[tuple[str, str]],
    sources: Counter[str],
    online: Counter[str],
    requests: Sequence[Request],
) -> None:
    """Metrics of a finished batch (a retried batch is counted once)."""
    for (topic, outcome), count in outcomes.items():
        metrics.EVENTS.labels(topic, outcome).inc(count)
        if outcome == "rejected":
            metrics.DLQ.labels(topic).inc(count)
    for source, count in sources.items():
        metrics.RECOMMENDATIONS.labels(source).inc(count)
    for name, count in online.items():
        kind, version = name.split(":", 1)
        counter = metrics.ONLINE_HITS if kind == "hits" else metrics.ONLINE_EVENTS
        counter.labels(version).inc(count)
    now = time.time()
    for request in requests:
        metrics.EVENT_LAG_SECONDS.observe(max(0.0, now - request.event.timestamp_ms / 1000))


# Errors that pass: an outage of Redis or Kafka, a timeout.
TRANSIENT: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    KafkaError,
    OSError,
    asyncio.TimeoutError,
)
# ... and another writer's change: the batch is read again on retry.
RETRYABLE = (*TRANSIENT, StaleStateError)

T = TypeVar("T")


async def with_retry(
    attempt: Callable[[], Awaitable[T]],
    *,
    max_delay_seconds: float = 10.0,
    retryable: tuple[type[BaseException], ...] = RETRYABLE,
) -> T:
    """Retry a batch step through transient outages instead of acking it unprocessed.

    Giving up would leave the worker a choice between acking events that were never applied
    (lost) and exiting; an outage should do neither. Every step of a batch is idempotent, so
    retrying is always safe.
    """
    delay = 0.1
    while True:
        try:
            return await attempt()
        except retryable as exc:
            metrics.RETRIES.inc()
            log.warning("batch failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_seconds)


@dataclass(eq=False)
class _InFlight:
    messages: Sequence[RawMessage]
    token: Any  # handed to on_committed
    applied: AppliedBatch
    before: _InFlight | None  # the batch submitted just before, until this one is done
    recommended: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    redone: bool = False  # committed through a fresh `process`, not as applied
    task: asyncio.Future[None] | None = None


class BatchPipeline:
    """Batches in flight at once, each one stage behind the one before it.

    Why: a batch's stages wait on different things: stage 1 (windows) is Python on the event
    loop, stage 2 (inference) runs in the executor thread and mostly holds no GIL, stage 3
    (payloads) is Python, and the commit mostly waits for Kafka and Redis. One batch at a time
    left the loop idle during inference and the thread idle the rest of the time. Here batch
    N+1 is applied while batch N is recommended and finished and batch N-1 commits. Stage 3
    runs in the executor too, as the event loop is the busier thread (bench/README.md).

    What keeps it equal to one batch at a time: every stage runs in submission order (each
    waits for the batch before it to finish that stage), a user in an uncommitted batch is
    taken from it rather than from Redis (`BatchProcessor.apply`), commits are serial, and each
    batch's messages are handed to ``on_committed`` (acked) only after its own commit. One
    difference remains: the popularity ranking (cold-start fallback) is read from Redis, so it
    lacks the events of batches not yet written. If a commit meets another writer
    (StaleStateError) every later batch in flight was computed on a state that never got
    written: each of them is redone with a fresh `process`, in order, and the next batch is
    applied only once they are done.
    """

    def __init__(
        self,
        processor: BatchProcessor,
        on_committed: Callable[[Any], None],
        on_fatal: Callable[[], Any],
        max_in_flight: int = 3,
    ) -> None:
        self.processor = processor
        self.on_committed = on_committed
        self.on_fatal = on_fatal  # an unexpected error: nothing may be acked after it
        self.max_in_flight = max_in_flight
        self._in_flight: deque[_InFlight] = deque()
        self._met_another_writer = False  # a commit raised StaleStateError: drain first
        self._cancelling = False
        self._computing = 0  # batches submitted whose stage 3 is not done
        # Set while no batch is in stages 1-3, i.e. the CPU would otherwise wait for I/O.
        self.computing_idle = asyncio.Event()
        self.computing_idle.set()

    async def wait_for_room(self) -> None:
        """Return once another batch may be submitted.

        Why the worker waits here before taking its next batch, not in `submit`: messages
        that arrive meanwhile join that batch, instead of waiting, already taken, in a batch
        that cannot start.
        """
        while True:
            while self._in_flight and self._in_flight[0].done.is_set():
                self._in_flight.popleft()
            if self._met_another_writer:
                # The batches in flight are being redone; one applied on top of them would
                # have to be redone too, and so on for as long as the backlog lasts.
                await self.drain()
                self._met_another_writer = False
            elif len(self._in_flight) >= self.max_in_flight:
                await self._in_flight[0].done.wait()
            else:
                return

    async def submit(self, messages: Sequence[RawMessage], token: Any) -> None:
        """Apply a batch (stage 1) and start the rest of it; returns without waiting for it."""
        await self.wait_for_room()
        self._computing += 1
        self.computing_idle.clear()
        try:
            await self._submit(messages, token)
        except BaseException:
            self._computed()
            raise

    def _computed(self) -> None:
        self._computing -= 1
        if not self._computing:
            self.computing_idle.set()

    async def _submit(self, messages: Sequence[RawMessage], token: Any) -> None:
        earlier = [f.applied for f in self._in_flight if not f.done.is_set()]
        applied = await with_retry(partial(self.processor.apply, messages, earlier))
        before = self._in_flight[-1] if self._in_flight else None
        flight = _InFlight(messages, token, applied, before)
        flight.task = asyncio.ensure_future(self._finish(flight))
        self._in_flight.append(flight)

    async def drain(self) -> None:
        """Wait until every submitted batch is committed."""
        while self._in_flight:
            await self._in_flight.popleft().done.wait()

    def cancel(self) -> None:
        """Stop what is in flight (shutting down: nothing more is acked; it replays)."""
        self._cancelling = True
        for flight in self._in_flight:
            if flight.task is not None:
                flight.task.cancel()
        self._in_flight.clear()

    async def _finish(self, flight: _InFlight) -> None:
        processor, before = self.processor, flight.before
        try:
            try:
                if before is not None:
                    await before.recommended.wait()
                recommended = await processor.recommend(flight.applied)  # no I/O: no retry
                flight.recommended.set()
                if before is not None:
                    await before.finished.wait()
                # In the executor too: it is Python either way, and the event loop is the
                # busier of the two threads (it applies the next batch, commits the one before).
                prepared = await asyncio.get_running_loop().run_in_executor(
                    processor.executor, processor.finish, flight.applied, recommended
                )
            finally:
                self._computed()
            flight.finished.set()
            redo = False
            if before is not None:
                await before.done.wait()
                redo = before.redone
                flight.before = None  # no chain of finished batches kept alive
            if not redo:
                try:
                    await with_retry(partial(processor.commit, prepared), retryable=TRANSIENT)
                except StaleStateError:
                    redo = True
            if redo:
                flight.redone = True
                self._met_another_writer = True
                await with_retry(partial(processor.process, flight.messages))
            self.on_committed(flight.token)
            flight.done.set()
        except asyncio.CancelledError:
            if not self._cancelling:  # not our cancel(): this batch would never be done
                self.on_fatal()
            raise
        except Exception:
            self.on_fatal()
            raise
