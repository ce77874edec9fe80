"""The inline delivery of streams/transport.py: a suspended callback finishes as a task would."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from faust.transport import drivers

from streams.transport import SCHEME, Transport, _finish


def test_scheme_selects_the_transport() -> None:
    assert drivers.by_url(f"{SCHEME}://127.0.0.1:9092") is Transport


async def _started(coro):
    """Run the first step inline, as Consumer.deliver does; return what it yielded."""
    return coro.send(None)


def test_finish_runs_the_rest_of_a_suspended_coroutine() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        steps: list[str] = []

        async def callback() -> int:
            steps.append("start")
            await asyncio.wait([asyncio.ensure_future(fut)])  # a future, then a wait
            await asyncio.sleep(0)  # a bare yield
            steps.append("end")
            return 42

        coro = callback()
        yielded = await _started(coro)
        assert steps == ["start"]
        loop.call_later(0.01, fut.set_result, 1)
        assert await _finish(coro, yielded) == 42
        assert steps == ["start", "end"]

    asyncio.run(main())


def test_finish_propagates_errors_and_cancellation() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        failing = loop.create_future()

        async def fails() -> None:
            await failing

        coro = fails()
        yielded = await _started(coro)
        loop.call_soon(failing.set_exception, ValueError("boom"))
        with pytest.raises(ValueError, match="boom"):
            await _finish(coro, yielded)

        never = loop.create_future()
        cleaned: list[bool] = []

        async def blocked() -> None:
            try:
                await never
            finally:
                cleaned.append(True)

        coro2 = blocked()
        task = asyncio.ensure_future(_finish(coro2, await _started(coro2)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == [True]
        assert never.cancelled()

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
