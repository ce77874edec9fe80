"""One micro-batch, end to end, as a plain async function the Faust agent calls.

validate -> read state (1 Redis round trip) -> window update -> recommend -> publish DLQ and
recommendations (wait for delivery) -> write state (1 atomic Redis round trip).

Ordering gives the delivery guarantees: state is written only after the batch's output is
delivered, and offsets are committed (by Faust, after the batch returns) only after the state
write. A crash anywhere replays the batch: already-applied messages are recognised by their
offsets and skipped, and recommendation ids are deterministic, so consumers can dedupe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import orjson
from aiokafka.errors import KafkaError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streams import metrics
from streams.events import Event, Rejection, Source, validate
from streams.recommend import Batch, Recommender, Request, StoredModelState, recommendation_event
from streams.settings import Settings
from streams.store import StaleStateError, StateStore, StoredUser, UserWrite, encode_offsets
from streams.window import (
    UserState,
    WindowEntry,
    WindowPolicy,
    apply_event,
    offsets_signature,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RawMessage:
    key: bytes | None
    value: bytes | None
    source: Source


@dataclass(frozen=True, slots=True)
class OutRecord:
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
class PreparedBatch:
    """A batch computed but not yet output: what `BatchProcessor.commit` publishes and writes."""

    result: BatchResult
    out: list[OutRecord]  # dead letters and recommendations, in order
    writes: dict[str, UserWrite]
    # Per touched user, what Redis holds once `writes` is written (for the next batch).
    stored_after: dict[str, StoredUser]
    new_items: list[tuple[str, int]]
    popularity_epoch_ms: int | None
    online: Counter[str]
    outcomes: Counter[tuple[str, str]]
    sources: Counter[str]
    requests: list[Request]
    seconds: float  # spent preparing


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
        """The whole batch, then return: `prepare` then `commit`."""
        prepared = await self.prepare(messages)
        await self.commit(prepared)
        return prepared.result

    async def prepare(
        self, messages: Sequence[RawMessage], after: PreparedBatch | None = None
    ) -> PreparedBatch:
        """Everything but the output: validate, read, window updates, recommend, payloads.

        ``after``: a prepared batch whose `commit` is still running (the worker overlaps one
        batch's commit with the next one's preparation). Its users are read from it, as they
        will be in Redis once it is written, not from Redis; the other users and the
        popularity ranking come from Redis, so the ranking may miss the last batch's events.
        This batch must then be committed after that one, and prepared again if that one's
        commit fails with StaleStateError.
        """
        started = time.perf_counter()
        result = BatchResult()
        # Metrics are counted per batch and reported once: a labelled inc() per event costs.
        outcomes: Counter[tuple[str, str]] = Counter()
        sources: Counter[str] = Counter()
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
        pending = after.stored_after if after is not None else {}
        read = await self.store.read_batch(
            (event.user_id for event in events if event.user_id not in pending),
            popular_n=settings.top_k + settings.window_length,
        )
        for event in events:
            user_id = event.user_id
            if user_id in pending and user_id not in read.users:
                read.users[user_id] = pending[user_id].copy()
        states: dict[str, UserState] = {uid: user.state for uid, user in read.users.items()}
        prior_windows = {uid: tuple(state.window) for uid, state in states.items()}
        prior_signatures = {uid: offsets_signature(state) for uid, state in states.items()}
        applied = self._apply(events, states, result, outcomes)
        requests, new_items = applied.requests, applied.new_items

        popular = self.store.merge_popularity(read.popular, new_items, read.popularity_epoch_ms)
        batch = Batch(
            requests=requests,
            prior_windows=prior_windows,
            stored={
                uid: StoredModelState(user.vector, user.memory, user.model_version)
                for uid, user in read.users.items()
            },
            prior_signatures=prior_signatures,
            final_signatures={uid: offsets_signature(states[uid]) for uid in states},
            popular=popular,
            k=settings.top_k,
        )
        recommender = self.recommender
        # Inference is CPU work: run it in a thread so the event loop keeps serving Kafka.
        recommended = await asyncio.get_running_loop().run_in_executor(
            self.executor, recommender.recommend, batch
        )
        last_recs = {uid: user.recs for uid, user in read.users.items()}
        online: Counter[str] = Counter()
        for request, recommendation in zip(requests, recommended.recommendations, strict=True):
            event = request.event
            previous = last_recs.get(event.user_id)
            if previous is not None:
                # Online quality: was this event among the items recommended just before it?
                online[f"events:{recommendation.model_version}"] += 1
                online[f"hits:{recommendation.model_version}"] += event.item_id in previous
            last_recs[event.user_id] = [item for item, _ in recommendation.items]
            payload = recommendation_event(event, recommendation)
            out.append(
                OutRecord(settings.topic_recommendations, event.user_id.encode(), _dumps(payload))
            )
            sources[recommendation.source] += 1
        result.recommendations = len(requests)

        writes: dict[str, UserWrite] = {}
        stored_after: dict[str, StoredUser] = {}
        for uid in result.touched_users:
            update = recommended.updates.get(uid)
            user = read.users[uid]
            write = writes[uid] = UserWrite(
                states[uid],
                read_offsets=user.raw_offsets,
                new_entries=applied.appended.get(uid, ()),
                replace=uid in applied.rewritten,
                vector=update.vector if update else None,
                memory=update.memory if update else None,
                model_version=update.model_version if update else None,
                recs=last_recs.get(uid),
            )
            stored_after[uid] = StoredUser(
                state=write.state,
                raw_offsets=encode_offsets(write.state.offsets),
                vector=write.vector if update else user.vector,
                memory=write.memory if update else user.memory,
                model_version=write.model_version if update else user.model_version,
                recs=write.recs if write.recs is not None else user.recs,
            )
        return PreparedBatch(
            result=result,
            out=out,
            writes=writes,
            stored_after=stored_after,
            new_items=new_items,
            popularity_epoch_ms=read.popularity_epoch_ms,
            online=online,
            outcomes=outcomes,
            sources=sources,
            requests=requests,
            seconds=time.perf_counter() - started,
        )

    async def commit(self, prepared: PreparedBatch) -> None:
        """Publish the batch's records (wait for the broker's acks), then write its state in
        one atomic script. Safe to retry; raises StaleStateError when another writer changed
        one of its users since it was read (prepare it again then)."""
        started = time.perf_counter()
        await self.publisher.publish(prepared.out)
        await self.store.write_batch(
            prepared.writes, prepared.new_items, prepared.popularity_epoch_ms, prepared.online
        )
        # Only once the batch has succeeded (a retried batch is counted once).
        _report(prepared.outcomes, prepared.sources, prepared.online, prepared.requests)
        metrics.BATCH_SECONDS.observe(prepared.seconds + time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(prepared.requests) + prepared.result.rejected)


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
