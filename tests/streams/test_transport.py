"""The fetch sink of streams/transport.py: whole fetches to the worker's agent, in order."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import inspect
import time
from pathlib import Path

import faust

from streams.transport import (
    FAUST_INTERNALS,
    Consumer,
    FetchSink,
    Transport,
    attach_fetch_sink,
)

# sha256 of the source of each entry of FAUST_INTERNALS in the pinned faust-streaming.
# A mismatch means faust changed code that streams/transport.py mirrors or extends: read the
# new code, bring streams/transport.py in line with it, then update the digest here.
PINNED_FAUST = "0.15.3"
FAUST_SOURCE_DIGESTS = {
    "faust.transport.consumer:Consumer._drain_messages": (
        "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417"
    ),
    "faust.transport.consumer:Consumer.getmany": (
        "4b168d84882a70d6e3e2f9804430a63b92f8fd117d3187cbb4aeb54305bda34e"
    ),
    "faust.transport.drivers.aiokafka:Consumer._new_consumer_thread": (
        "0870ec53dea75083995e3565c0f0a25a1c63ecceaeb238e92e2585e3623af5a9"
    ),
    "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread._create_worker_consumer": (
        "c2701bfc3e6f6cad95c2be36d6a255a86e2c57d18d36cc1082b5fb5c482d99d7"
    ),
}


def _source_digest(name: str) -> str:
    module_name, qualname = name.split(":")
    target: object = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return hashlib.sha256(inspect.getsource(target).encode()).hexdigest()  # type: ignore[arg-type]


def test_faust_still_has_the_internals_the_consumer_relies_on() -> None:
    assert faust.__version__ == PINNED_FAUST, (
        f"faust-streaming {faust.__version__} is installed, streams/transport.py was written "
        f"against {PINNED_FAUST}: check FAUST_INTERNALS there, then update this pin"
    )
    assert set(FAUST_SOURCE_DIGESTS) == set(FAUST_INTERNALS)
    changed = [n for n, d in FAUST_SOURCE_DIGESTS.items() if _source_digest(n) != d]
    assert not changed, f"faust changed code streams/transport.py relies on: {changed}"


def test_aiokafka_still_reads_the_fetch_wait_the_consumer_thread_sets() -> None:
    """ConsumerThread sets AIOKafkaConsumer._fetch_max_wait_ms, read when it starts."""
    from aiokafka import AIOKafkaConsumer

    assert "self._fetch_max_wait_ms" in inspect.getsource(AIOKafkaConsumer.start), (
        "aiokafka no longer reads _fetch_max_wait_ms in start(): see streams/transport.py"
    )


def _sink(max_messages: int = 4000) -> FetchSink:
    app = faust.App("sink-test", broker="memory://")
    app.flow_control.resume()
    return FetchSink(app, ["clicks"], max_messages=max_messages)


def test_the_app_consumes_through_its_sink() -> None:
    app = faust.App("sink-app-test", broker="kafka://127.0.0.1:9")
    sink = attach_fetch_sink(app, ["clicks"], max_messages=10, fetch_max_wait_ms=5)
    app.topic("clicks")  # the conductor and consumer come from the transport attached
    assert isinstance(app.transport, Transport)
    assert app.transport.sink is sink
    assert isinstance(app.consumer, Consumer)
    assert sink.topics == {"clicks"}


def test_take_joins_fetches_in_order_and_keeps_the_rest_for_the_next_batch() -> None:
    async def main() -> None:
        sink = _sink()
        await sink.put([1, 2, 3])  # type: ignore[list-item]  # stands for messages
        await sink.put([4, 5, 6, 7])  # type: ignore[list-item]
        await sink.put([8])  # type: ignore[list-item]
        assert await sink.take(5, within=0.0) == [1, 2, 3, 4, 5]
        assert await sink.take(5, within=0.0) == [6, 7, 8]

    asyncio.run(main())


def test_take_waits_at_most_within_for_a_batch_to_fill() -> None:
    async def main() -> None:
        sink = _sink()
        await sink.put([1])  # type: ignore[list-item]
        started = time.monotonic()
        assert await sink.take(100, within=0.05) == [1]
        assert time.monotonic() - started >= 0.05

        async def later() -> None:
            await asyncio.sleep(0.01)
            await sink.put([3, 4])  # type: ignore[list-item]

        await sink.put([2])  # type: ignore[list-item]
        feeding = asyncio.ensure_future(later())
        assert await sink.take(3, within=5.0) == [2, 3, 4]  # full before the 5 s
        await feeding

    asyncio.run(main())


def test_within_counts_from_when_the_oldest_message_arrived() -> None:
    async def main() -> None:
        sink = _sink()
        await sink.put([1])  # type: ignore[list-item]
        await asyncio.sleep(0.06)  # it waited while the worker was busy with other batches
        started = time.monotonic()
        assert await sink.take(100, within=0.05) == [1]
        assert time.monotonic() - started < 0.04

    asyncio.run(main())


def test_flush_takes_what_is_there_without_waiting_for_the_batch_to_fill() -> None:
    async def main() -> None:
        sink = _sink()
        flush = asyncio.Event()
        await sink.put([1])  # type: ignore[list-item]

        async def idle_later() -> None:
            await asyncio.sleep(0.02)
            flush.set()

        setting = asyncio.ensure_future(idle_later())
        started = time.monotonic()
        assert await sink.take(100, within=5.0, flush=flush) == [1]
        assert 0.02 <= time.monotonic() - started < 1.0
        await setting
        await sink.put([2])  # type: ignore[list-item]
        started = time.monotonic()
        assert await sink.take(100, within=5.0, flush=flush) == [2]  # already set: at once
        assert time.monotonic() - started < 0.5

    asyncio.run(main())


def test_a_full_sink_holds_the_consumer_back_by_messages_not_fetches() -> None:
    async def main() -> None:
        sink = _sink(max_messages=3)
        await sink.put([1])  # type: ignore[list-item]
        await sink.put([2])  # type: ignore[list-item]
        await sink.put([3, 4])  # type: ignore[list-item]  # below the bound when it came
        blocked = asyncio.ensure_future(sink.put([5]))  # type: ignore[list-item]
        await asyncio.sleep(0.01)
        assert not blocked.done()
        assert sink.buffered == 4
        assert await sink.take(2, within=0.0) == [1, 2]
        await asyncio.wait_for(blocked, 1)
        assert await sink.take(10, within=0.0) == [3, 4, 5]

    asyncio.run(main())


def test_a_rebalance_drops_what_was_fetched_but_not_taken() -> None:
    async def main() -> None:
        sink = _sink()
        await sink.put([1, 2, 3])  # type: ignore[list-item]
        await sink.put([4])  # type: ignore[list-item]
        assert await sink.take(2, within=0.0) == [1, 2]  # 3 kept for the next batch
        assert not sink.rebalanced()
        sink.app.flow_control.clear()  # what faust does when partitions are revoked
        assert sink.rebalanced() and not sink.rebalanced()  # told once: the worker drops caches
        await sink.put([9])  # type: ignore[list-item]  # re-fetched after the rebalance
        assert await sink.take(10, within=0.0) == [9]

    asyncio.run(main())


def test_the_worker_consumer_waits_as_long_as_the_setting_says(tmp_path: Path) -> None:
    from streams.settings import Settings
    from streams.worker import create_app

    async def consumer_wait_ms(settings: Settings) -> int:
        app = create_app(settings, tmp_path / settings.group_id)
        thread = app.consumer._new_consumer_thread()
        consumer = thread._create_worker_consumer(app.transport)  # built, never started
        return consumer._fetch_max_wait_ms

    fast = Settings(bootstrap_servers="127.0.0.1:9", group_id="g1", kafka_fetch_max_wait_ms=7)
    assert asyncio.run(consumer_wait_ms(fast)) == 7
    assert asyncio.run(consumer_wait_ms(Settings(group_id="g2"))) == 50  # the default
