"""A faust Kafka transport whose consumer hands messages to the streams without a task per message.

Why: faust 0.15.3's ``Consumer._drain_messages`` delivers every fetched message with
``await self.wait_first(callback(message), self.suspend_flow.wait())``, i.e. four new tasks and
an ``asyncio.wait`` per message (the callback, the suspend event, the stopped and crashed
events). On this 2-core machine that caps a no-op agent at 4-7k events/s, with most samples in
the event loop turning over between those handoffs (DESIGN.md, "Facts measured here").

What changes: nothing but that handoff. Each delivery first runs the callback's coroutine one
step, inline. In the steady state (the stream buffer has room, flow control is active, the
producer buffer has ebbed) faust's ``on_message`` finishes in that step: the message is in the
agent's queue, no task was created and the event loop did not turn. Only when the callback
*suspends* (buffer full, flow suspended for a rebalance, producer back-pressure) is the rest of
it raced against ``suspend_flow`` exactly as faust does, through ``wait_first``, so a rebalance
still abandons a blocked delivery. Flow is also checked before every delivery (an attribute read)
and stops the rest of the fetched batch, as faust's ``getmany`` does. Offsets, gaps, acks and
commits are handled by faust's own code, unchanged.

Selected with the broker URL scheme ``interest-kafka://host:port`` (registered below in faust's
transport registry); everything else is faust's aiokafka driver.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any, cast

from faust.transport import drivers
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP, Message
from mode import Service

SCHEME = "interest-kafka"
# Yield to the event loop after this many inline deliveries, so the agents drain their buffers
# while a large fetch is handed over (faust yields every 100 too).
YIELD_EVERY = 100


async def _finish(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    """Drive the rest of ``coro``, whose first step already ran and yielded ``yielded``.

    What ``asyncio.Task`` does for a coroutine, from its second step on: wait for the future it
    yielded (a bare ``yield`` means "one loop turn"), then resume it; exceptions, including a
    cancellation of this task, are thrown into it at its suspension point.
    """
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)
            else:
                # As Task.__step does: the coroutine's own await marked the future blocking.
                yielded._asyncio_future_blocking = False
                await yielded
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value


# Where create_app leaves Settings.kafka_fetch_max_wait_ms for the consumer thread to read.
FETCH_MAX_WAIT_ATTR = "interest_fetch_max_wait_ms"


class ConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    """faust's consumer thread with a configurable fetch wait (faust hard-codes 1500 ms).

    Why: a fetch that finds no new data waits up to ``fetch_max_wait_ms`` on the broker. Kafka
    ends that wait as soon as data arrives, so there the setting only paces empty polls; the
    embedded broker (Tansu) does not, so there the wait adds to every event's latency (produce
    -> consume on Tansu, no worker: p50 216 ms at aiokafka's default 500 ms, 6 ms at 10 ms;
    bench/README.md, "Streaming").
    """

    def _create_worker_consumer(
        self, transport: aiokafka_driver.Transport
    ) -> aiokafka_driver.aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        wait_ms = getattr(self.app, FETCH_MAX_WAIT_ATTR, None)
        if wait_ms is not None:
            consumer._fetch_max_wait_ms = int(wait_ms)  # read when AIOKafkaConsumer.start()s
        return consumer


class Consumer(aiokafka_driver.Consumer):
    """faust's aiokafka consumer with an inline (task-free) delivery in the common case."""

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def deliver(self, message: Message) -> None:
        """Hand one message to the callback (faust's conductor: decode, put in stream buffers)."""
        coro = self.callback(message)
        try:
            yielded = coro.send(None)
        except StopIteration:
            return  # delivered inline: the fast path
        # The callback is waiting (buffer full, flow control, producer): race it against a
        # suspended flow exactly as faust does; wait_first cancels the loser.
        await self.wait_first(_finish(coro, yielded), self.suspend_flow.wait())

    async def _drain_messages(self, fetcher: Service) -> None:  # pragma: no cover - via tests
        # faust's loop (transport/consumer.py), with ``deliver`` in place of wait_first.
        getmany = self.getmany
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        flag_consumer_fetching = CONSUMER_FETCHING
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        suspended = self.suspend_flow.is_set
        deliver = self.deliver
        since_yield = 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(flag_consumer_fetching)
                ait = cast(AsyncIterator[tuple[TP, Message]], getmany(timeout=1.0))
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in ait:
                        if suspended():
                            # A rebalance began: deliver nothing more from this fetch
                            # (getmany stops too, and seeks back to committed offsets).
                            break
                        since_yield += 1
                        if since_yield >= YIELD_EVERY:
                            since_yield = 0
                            await asyncio.sleep(0)
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                                await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            await deliver(message)
                            set_read_offset(tp, offset)
                    unset_flag(flag_consumer_fetching)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(flag_consumer_fetching)


class Transport(aiokafka_driver.Transport):
    """faust's aiokafka transport with the consumer above."""

    Consumer = Consumer


drivers.TRANSPORTS.aliases.setdefault(SCHEME, f"{__name__}:Transport")
