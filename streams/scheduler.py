"""Batches in flight at once, each one stage behind the one before it.

Why: a batch's stages wait on different things: stage 1 (windows) is Python on the event loop,
stage 2 (inference) runs in the executor thread and mostly holds no GIL, stage 3 (payloads) is
Python, and the commit mostly waits for Kafka and Redis. One batch at a time leaves the loop
idle during inference and the thread idle the rest of the time. Here batch N+1 is applied while
batch N is recommended and finished and batch N-1 commits. Stage 3 runs in the executor too,
as the event loop is the busier thread.

What keeps it equal to one batch at a time (`BatchProcessor.process`, its reference in
tests/streams/test_scheduler.py): every stage runs in submission order (each waits for the batch
before it to finish that stage), a user in an uncommitted batch is taken from it rather than
from Redis, commits are serial, and each batch's messages are handed to ``on_committed``
(acked) only after its own commit. One difference remains: the popularity ranking (cold-start
fallback) is read from Redis, so it lacks the events of batches not yet written. If a commit
meets another writer (StaleStateError) every later batch in flight was computed on a state
that never got written: each of them is redone with a fresh `process`, in order, and the next
batch is applied only once they are done.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from streams.messages import RawMessage
from streams.processor import TRANSIENT, BatchProcessor, with_retry
from streams.recommend import StoredModelState
from streams.stages import Applied, Prepared, Recommended
from streams.store import StaleStateError


@dataclass(eq=False)
class _InFlight:
    """The scheduler's record of one batch: its stage results as they come."""

    messages: Sequence[RawMessage]
    token: Any  # handed to on_committed
    applied: Applied
    before: _InFlight | None  # the batch submitted just before, until this one is done
    # The earlier batch each carried user comes from, until this batch's stage 3 is done.
    sources: dict[str, _InFlight]
    recommended: Recommended | None = None
    prepared: Prepared | None = None
    recommended_set: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    redone: bool = False  # committed through a fresh `process`, not as applied
    task: asyncio.Future[None] | None = None

    def carried_models(self) -> dict[str, StoredModelState]:
        """Each carried user's model state, as its earlier batch's stage 2 left it."""
        return {uid: _done(src.recommended).model_after(uid) for uid, src in self.sources.items()}

    def carried_recs(self) -> dict[str, list[str] | None]:
        """Each carried user's last recommendation, as its earlier batch's stage 3 left it."""
        return {uid: _done(src.prepared).recs_after(uid) for uid, src in self.sources.items()}


T = TypeVar("T")


def _done(result: T | None) -> T:
    assert result is not None, "an earlier batch's stage is not done"
    return result


class BatchPipeline:
    """Up to ``max_in_flight`` batches, a stage apart (the module docstring says why)."""

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
        earlier = [f for f in self._in_flight if not f.done.is_set()]
        apply = partial(self.processor.apply, messages, [f.applied for f in earlier])
        applied = await with_retry(apply)
        sources = {uid: earlier[index] for uid, index in applied.carried_from.items()}
        before = self._in_flight[-1] if self._in_flight else None
        flight = _InFlight(messages, token, applied, before, sources)
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
        try:
            try:
                prepared = await self._compute(flight)
            finally:
                self._computed()
            flight.finished.set()
            await self._commit(flight, prepared)
            self.on_committed(flight.token)
            flight.done.set()
        except asyncio.CancelledError:
            if not self._cancelling:  # not our cancel(): this batch would never be done
                self.on_fatal()
            raise
        except Exception:
            self.on_fatal()
            raise

    async def _compute(self, flight: _InFlight) -> Prepared:
        """Stages 2 and 3, each after the batch before has done it."""
        processor, before = self.processor, flight.before
        if before is not None:
            await before.recommended_set.wait()
        # No I/O: no retry.
        flight.recommended = await processor.recommend(flight.applied, flight.carried_models())
        flight.recommended_set.set()
        if before is not None:
            await before.finished.wait()
        # In the executor too: it is Python either way, and the event loop is the busier of
        # the two threads (it applies the next batch, commits the one before).
        flight.prepared = await asyncio.get_running_loop().run_in_executor(
            processor.executor,
            processor.finish,
            flight.applied,
            flight.recommended,
            flight.carried_recs(),
        )
        flight.sources = {}  # resolved: no chain of batches kept alive
        return flight.prepared

    async def _commit(self, flight: _InFlight, prepared: Prepared) -> None:
        """Commit after the batch before; redo the batch afresh where that one was redone or
        another writer changed its users."""
        before, processor = flight.before, self.processor
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
