"""BatchPipeline (batches in flight a stage apart) against its plain reference, one batch at a
time (`BatchProcessor.process`): the same state in the real Redis, the same records, in order.

The publisher is an in-memory recorder (the Kafka side has its own tests, test_publish.py and
test_worker.py); Redis is the embedded stack's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

pytest.importorskip("torch", reason="needs the training extra (pip install -e .[train])")

from export.runtime import EncoderRuntime
from streams import metrics
from streams.encoder_recommender import EncoderRecommender
from streams.events import Source
from streams.messages import OutRecord, RawMessage
from streams.processor import BatchProcessor
from streams.redis_client import connect
from streams.scheduler import BatchPipeline
from streams.settings import Settings
from streams.store import StateStore, UserWrite
from streams.window import UserState, WindowEntry
from tests.streams.test_encoder_stream import ITEMS, make_bundle


class RecordingPublisher:
    """Keeps what would be sent; ``hold`` makes publish wait (a slow broker)."""

    def __init__(self) -> None:
        self.records: list[OutRecord] = []
        self.hold: asyncio.Event | None = None
        self.waiting = asyncio.Event()

    async def publish(self, records: Sequence[OutRecord]) -> None:
        if self.hold is not None:
            self.waiting.set()
            await self.hold.wait()
        self.records.extend(records)


def batches(settings: Settings) -> list[list[RawMessage]]:
    """Ten batches of a few users each, users recurring across consecutive batches, with a
    replayed message, an out-of-time-order event and a malformed one."""
    out: list[list[RawMessage]] = []
    offset = 0
    for b in range(10):
        batch = []
        for u in range(b % 3, b % 3 + 4):
            user = f"u{u}"
            ts = 1_700_000_000_000 + 1_000 * offset
            if b == 6 and u == b % 3:
                ts -= 500_000  # older than the user's newest event: inserted, not appended
            event = {
                "event_id": f"e{offset}",
                "user_id": user,
                "item_id": ITEMS[(7 * offset + u) % len(ITEMS)],
                "event_type": "click",
                "timestamp": ts,
            }
            batch.append(
                RawMessage(
                    user.encode(),
                    json.dumps(event).encode(),
                    Source(settings.topic_clicks, 0, offset),
                )
            )
            offset += 1
        if b == 4:
            batch.append(batch[0])  # a replay of a message already in this batch
            batch.append(RawMessage(b"u9", b"{not json", Source(settings.topic_clicks, 0, offset)))
            offset += 1
        out.append(batch)
    return out


async def user_states(store: StateStore, users: Sequence[str]) -> dict[str, Any]:
    states = {}
    for user in users:
        stored = await store.read_user(user)
        assert stored is not None
        states[user] = (
            [e.event_id for e in stored.state.window],
            stored.state.offsets,
            stored.vector,
            stored.memory,
            stored.recs,
        )
    return states


def payloads(records: Sequence[OutRecord]) -> list[tuple[str, bytes | None, dict[str, Any]]]:
    out = []
    for record in records:
        value = json.loads(record.value)
        value.pop("generated_at", None)  # wall clock
        out.append((record.topic, record.key, value))
    return out


def processor_for(settings: Settings, bundle: Path, prefix: str) -> BatchProcessor:
    local = settings.model_copy(update={"redis_key_prefix": prefix})
    recommender = EncoderRecommender(EncoderRuntime.load(bundle, device="cpu"), cache_users=100)
    return BatchProcessor(
        local, StateStore(connect(local), local), recommender, RecordingPublisher()
    )


def pipeline_for(
    settings: Settings, bundle: Path
) -> tuple[BatchProcessor, RecordingPublisher, BatchPipeline, list[int]]:
    """A pipeline over a fresh processor, its recording publisher, and what it acked."""
    processor = processor_for(settings, bundle, settings.redis_key_prefix)
    publisher = processor.publisher
    assert isinstance(publisher, RecordingPublisher)
    acked: list[int] = []
    pipeline = BatchPipeline(processor, on_committed=acked.append, on_fatal=pytest.fail)
    return processor, publisher, pipeline, acked


def test_batches_in_flight_leave_what_one_batch_at_a_time_leaves(
    settings: Settings, tmp_path: Path
) -> None:
    _, bundle = make_bundle(tmp_path, seed=5)
    users = [f"u{u}" for u in range(6)]

    async def main() -> None:
        reference = processor_for(settings, bundle, settings.redis_key_prefix + ":ref")
        for batch in batches(settings):
            await reference.process(batch)

        piped = processor_for(settings, bundle, settings.redis_key_prefix + ":piped")
        acked: list[int] = []
        pipeline = BatchPipeline(piped, on_committed=acked.append, on_fatal=pytest.fail)
        for i, batch in enumerate(batches(settings)):
            await pipeline.submit(batch, i)
        await pipeline.drain()

        assert acked == list(range(10))  # each batch once, in order
        assert await user_states(piped.store, users) == await user_states(reference.store, users)
        assert payloads(piped.publisher.records) == payloads(reference.publisher.records)
        for processor in (reference, piped):
            await processor.store.client.aclose()

    asyncio.run(main())


def test_every_stage_of_every_batch_is_timed(settings: Settings, tmp_path: Path) -> None:
    """`interest_stage_seconds`: what tells an operator which stage bounds the rate."""
    _, bundle = make_bundle(tmp_path, seed=5)
    stages = metrics.STAGES

    def timed() -> list[tuple[float, float]]:
        sample = REGISTRY.get_sample_value
        return [
            (
                sample("interest_stage_seconds_count", {"stage": stage}) or 0.0,
                sample("interest_stage_seconds_sum", {"stage": stage}) or 0.0,
            )
            for stage in stages
        ]

    async def main() -> None:
        _, _, pipeline, _ = pipeline_for(settings, bundle)
        before = timed()
        for i, batch in enumerate(batches(settings)):
            await pipeline.submit(batch, i)
        await pipeline.drain()
        after = timed()
        for stage, (count, total), (count_after, total_after) in zip(
            stages, before, after, strict=True
        ):
            assert count_after - count == 10, stage
            assert total_after > total, stage
        await pipeline.processor.store.client.aclose()

    asyncio.run(main())


def test_a_commit_that_meets_another_writer_redoes_the_batches_after_it(
    settings: Settings, tmp_path: Path
) -> None:
    _, bundle = make_bundle(tmp_path, seed=6)
    first, second, *rest = batches(settings)  # u1, u2 and u3 are in the first two

    async def main() -> None:
        processor, publisher, pipeline, acked = pipeline_for(settings, bundle)
        redone: list[int] = []
        process = processor.process

        async def counted(messages: Sequence[RawMessage]) -> Any:
            redone.append(1)
            return await process(messages)

        processor.process = counted  # type: ignore[method-assign]

        publisher.hold = asyncio.Event()
        await pipeline.submit(first, 0)
        await publisher.waiting.wait()  # the first batch is committing, not yet written
        # Meanwhile another worker (a zombie during a rebalance) applies an event for u1.
        other = StateStore(connect(processor.settings), processor.settings)
        theirs = UserState([WindowEntry("theirs", ITEMS[1], "click", 1)], {"elsewhere/0": 5})
        await other.write_batch({"u1": UserWrite(theirs, new_entries=theirs.window)}, [], None)
        await pipeline.submit(second, 1)  # prepared on top of the first batch's state
        publisher.hold.set()
        publisher.hold = None
        for i, batch in enumerate(rest, start=2):  # a backlog behind them
            await pipeline.submit(batch, i)
        await pipeline.drain()

        assert acked == list(range(10))
        # The batches applied on the state that was never written (those in flight) are
        # redone; the backlog behind them is applied afresh, not redone in a cascade.
        assert 2 <= len(redone) <= pipeline.max_in_flight
        stored = await processor.store.read_user("u1")
        assert stored is not None
        everything = [m for batch in (first, second, *rest) for m in batch]
        u1 = [m for m in everything if m.key == b"u1"]
        # (one of them is replayed in its batch: applied once)
        expected = ["theirs", *dict.fromkeys(json.loads(m.value)["event_id"] for m in u1)]
        assert sorted(e.event_id for e in stored.state.window) == sorted(expected)
        newest = max(m.source.offset for m in u1)
        assert stored.state.offsets == {"elsewhere/0": 5, f"{settings.topic_clicks}/0": newest}
        for user in ("u0", "u2", "u3", "u4"):  # every event applied exactly once
            window = (await processor.store.read_user(user)).state.window  # type: ignore[union-attr]
            ids = [e.event_id for e in window]
            assert len(ids) == len(set(ids))
        await other.client.aclose()
        await processor.store.client.aclose()

    asyncio.run(main())


def test_computing_idle_tells_the_worker_when_no_batch_is_being_computed(
    settings: Settings, tmp_path: Path
) -> None:
    """The worker takes a partial batch at once only while this is set (streams/worker.py)."""
    _, bundle = make_bundle(tmp_path, seed=7)
    first, second, *_ = batches(settings)

    async def main() -> None:
        processor, publisher, pipeline, acked = pipeline_for(settings, bundle)
        assert pipeline.computing_idle.is_set()
        publisher.hold = asyncio.Event()
        await pipeline.submit(first, 0)
        assert not pipeline.computing_idle.is_set()  # stages 2 and 3 to come
        await publisher.waiting.wait()  # computed; only its commit is left
        assert pipeline.computing_idle.is_set()
        await pipeline.submit(second, 1)
        assert not pipeline.computing_idle.is_set()
        publisher.hold.set()
        await pipeline.drain()
        assert pipeline.computing_idle.is_set()
        assert acked == [0, 1]
        await processor.store.client.aclose()

    asyncio.run(main())
