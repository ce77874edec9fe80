"""A micro-batch's stages with their I/O: the store's read and write, the publisher, the
inference thread, and retry through transient outages.

One batch: check -> read state (one Redis round trip) -> window update -> recommend ->
payloads -> publish dead letters and recommendations (wait for delivery) -> write state (one
atomic Redis round trip). The logic of each stage is in `streams/stages.py`; `BatchPipeline`
(`streams/scheduler.py`) keeps several batches in flight, a stage apart.

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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import replace
from typing import TypeVar

from aiokafka.errors import KafkaError
from redis.exceptions import AskError, ClusterError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streams import metrics
from streams.exposure import Exposure, ExposureWindow
from streams.messages import RawMessage
from streams.publish import Publisher
from streams.recommend import Batch, Recommender, Result, StoredModelState
from streams.settings import Settings
from streams.stages import (
    Applied,
    BatchResult,
    Prepared,
    Recommended,
    apply_batch,
    carried_users,
    check_messages,
    finish,
    model_batch,
)
from streams.store import StaleStateError, StateStore
from streams.window import WindowPolicy

log = logging.getLogger(__name__)


class BatchProcessor:
    """Runs one batch's stages; each method is one stage (`BatchPipeline` overlaps them)."""

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
            settings.window_length,
            int(max_age * 1000) if max_age is not None else None,
            tuple(settings.input_topics),
        )
        self._inference = asyncio.Lock()  # one recommend call at a time
        self._exposure: ExposureWindow | None = None  # of the model that served last

    def drop_caches(self) -> None:
        """Forget every user this worker holds in memory; call with no batch in flight."""
        self.store.drop_cache()
        self.recommender.drop_cache()

    async def process(self, messages: Sequence[RawMessage]) -> BatchResult:
        """The whole batch, one stage after the other: the plain reference `BatchPipeline`
        is tested against."""
        applied = await self.apply(messages)
        recommended = await self.recommend(applied, {})
        prepared = self.finish(applied, recommended, {})
        await self.commit(prepared)
        return prepared.result

    async def apply(
        self, messages: Sequence[RawMessage], earlier: Sequence[Applied] = ()
    ) -> Applied:
        """Stage 1, on the event loop: check, read the users' state, update their windows.

        ``earlier``: batches applied but not yet committed, oldest first (`BatchPipeline`).
        Their users start from what those batches leave, not from Redis, which does not hold
        it yet; the popularity ranking still comes from Redis, so it may miss their events.
        """
        started = time.perf_counter()
        checked = check_messages(messages, self.settings)
        carried = carried_users(checked.events, earlier)
        read = await self.store.read_batch(
            (event.user_id for event in checked.events if event.user_id not in carried),
            popular_n=self.settings.top_k + self.settings.window_length,
        )
        rank = self.store.merge_popularity
        applied = apply_batch(checked, read, earlier, carried, self.policy, rank)
        return replace(applied, seconds=metrics.observe_stage("apply", started))

    async def recommend(
        self, applied: Applied, carried_models: Mapping[str, StoredModelState]
    ) -> Recommended:
        """Stage 2, in the executor thread: the recommender over the batch's requests.

        ``carried_models``: the model state of each user carried from an earlier batch, as
        that batch's stage 2 left it. Recommendations never run concurrently (the encoder's
        state cache is not thread-safe).
        """
        started = time.perf_counter()
        batch = model_batch(applied, carried_models, self.settings.top_k)
        recommender = self.recommender
        preparing = time.perf_counter() - started
        async with self._inference:
            # Inference is CPU work: run it in a thread so the event loop keeps serving Kafka.
            result, computing = await asyncio.get_running_loop().run_in_executor(
                self.executor, _timed_recommend, recommender, batch
            )
        # Not the waits for the lock or the thread (the batch before may hold them).
        return Recommended(result, batch.stored, preparing + computing)

    def finish(
        self,
        applied: Applied,
        recommended: Recommended,
        carried_recs: Mapping[str, list[str] | None],
    ) -> Prepared:
        """Stage 3: payloads, online hit rate and the state to write; no I/O (`BatchPipeline`
        runs it in the executor thread, beside the next batch's stage 1). ``carried_recs``:
        each carried user's last recommendation, as the earlier batch's stage 3 left it."""
        started = time.perf_counter()
        prepared = finish(applied, recommended, carried_recs, self.settings.topic_recommendations)
        seconds = applied.seconds + recommended.seconds + metrics.observe_stage("finish", started)
        return replace(prepared, seconds=seconds)

    async def commit(self, prepared: Prepared) -> None:
        """Publish the batch's records (wait for the broker's acks), then write its state in
        one atomic script. Safe to retry; raises StaleStateError when another writer changed
        one of its users since it was read (prepare it again then)."""
        started = time.perf_counter()
        await self.publisher.publish(prepared.out)
        metrics.observe_stage("publish", started)
        writing = time.perf_counter()
        await self.store.write_batch(
            prepared.writes,
            prepared.new_items,
            prepared.popularity_epoch_ms,
            prepared.online,
            prepared.new_sources,
            prepared.online_events,
        )
        metrics.observe_stage("write", writing)
        # Only once the batch has succeeded (a retried batch is counted once).
        metrics.report_batch(
            prepared.outcomes,
            prepared.rejected,
            prepared.sources,
            prepared.online,
            prepared.requests,
        )
        if prepared.exposure is not None:
            self._count_exposure(prepared.exposure)
        metrics.FORGETS.inc(len(prepared.forget_ids))
        for forget_id in prepared.forget_ids:  # the request's id only: no user data in logs
            log.warning("forget request %s applied", forget_id)
        metrics.BATCH_SECONDS.observe(prepared.seconds + time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(prepared.requests) + prepared.result.rejected)

    def _count_exposure(self, exposure: Exposure) -> None:
        """Into the window of the model that recommended them; a new model starts a new
        window (its catalogue and long tail are its own)."""
        if self._exposure is None or self._exposure.catalogue is not exposure.catalogue:
            self._exposure = ExposureWindow(exposure.catalogue, self.settings.exposure_window)
            metrics.new_exposure_window()
        head, tail = self._exposure.add(exposure.items)
        metrics.report_exposure(self._exposure, head, tail)


def _timed_recommend(recommender: Recommender, batch: Batch) -> tuple[Result, float]:
    """The recommender's call and its seconds, timed in the thread that runs it (not its wait
    for the thread, which may still be finishing the batch before)."""
    started = time.perf_counter()
    result = recommender.recommend(batch)
    return result, metrics.observe_stage("recommend", started)


# Errors that pass: an outage of Redis or Kafka, a timeout.
# On Redis Cluster also what a failover or a slot move answers once redis-py's own
# redirections and retries are spent: every step of a batch is safe to run again.
TRANSIENT: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,
    TryAgainError,
    AskError,
    SlotNotCoveredError,
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
