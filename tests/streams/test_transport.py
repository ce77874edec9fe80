"""The fetch sink of streams/transport.py: whole fetches to the worker's agent, in order."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import faust
from faust.transport import drivers

from streams.transport import FETCH_SINK_ATTR, SCHEME, FetchSink, Transport


def test_scheme_selects_the_transport() -> None:
    assert drivers.by_url(f"{SCHEME}://127.0.0.1:9092") is Transport


def _sink(max_messages: int = 4000) -> FetchSink:
    app = faust.App("sink-test", broker="memory://")
    app.flow_control.resume()
    return FetchSink(app, ["clicks"], max_messages=max_messages)


def test_the_app_knows_its_sink() -> None:
    sink = _sink()
    assert getattr(sink.app, FETCH_SINK_ATTR) is sink
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
        sink.app.flow_control.clear()  # what faust does when partitions are revoked
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
