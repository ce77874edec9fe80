"""The worker's consumer: faust's Kafka consumer handing the agent whole fetches.

This is the one module that relies on faust's private internals (its consumer's fetch loop);
`FAUST_INTERNALS` lists what it relies on, and tests/streams/test_transport.py fails loudly when
the pinned faust changes any of it.

Why: faust moves every fetched message on its own: ``getmany`` yields it, the consumer
delivers it with ``await self.wait_first(callback(message), self.suspend_flow.wait())`` (four
new tasks and an ``asyncio.wait``), the conductor decodes it into an event and puts it in the
agent's queue, the stream and ``take`` hand it on one at a time, and each ack runs the stream's
bookkeeping. On a small machine that machinery alone caps a no-op agent well below the rate
the worker's own work allows.

What changes: for the topics of the `FetchSink` (the worker's input topics), one fetch becomes
one list of messages, put in the sink in one step. The worker sees only the sink's two calls:
``take`` a batch, and ``ack`` it once it is written. Everything else stays faust's: the
consumer group, offsets, gap tracking, commits (``commit_every`` and the periodic commit), flow
control and rebalances:

- each delivered message is tracked in the consumer's unacked set, as the conductor does, so a
  rebalance waits for the batch in flight (``wait_empty``) before offsets are committed;
- the sink is managed by the app's flow control, so a revocation clears the fetches not yet
  taken (they are re-fetched from the committed offsets after the rebalance, as faust does
  with its stream buffers);
- a fetch waits for room in the sink (back-pressure), raced against a suspended flow exactly
  as faust races each delivery.

Messages of other topics (none in the worker) go through faust's per-message delivery,
unchanged. `attach_fetch_sink` installs all this as the app's consumer transport.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP, AppT, Message
from mode import Service

# What this module takes from faust beyond its public API: the methods whose code it mirrors
# or extends. tests/streams/test_transport.py pins a digest of each one's source.
FAUST_INTERNALS = (
    "faust.transport.consumer:Consumer._drain_messages",
    "faust.transport.consumer:Consumer.getmany",
    "faust.transport.drivers.aiokafka:Consumer._new_consumer_thread",
    "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread._create_worker_consumer",
)


class FetchSink:
    """Whole fetches of some topics, from the consumer to one batch-processing agent.

    The sink holds at most ``max_messages`` messages (a fetch that arrives below the bound is
    taken whole): while the agent processes one batch the consumer fetches the next ones, and
    stops when the sink is full. The bound is in messages, not fetches: at a low rate a fetch
    holds a few dozen messages, and a bound of a few fetches stopped the consumer with a
    fraction of a batch buffered while the events waited on the broker. The app's flow control
    clears the sink when partitions are revoked or assigned, as it clears faust's stream
    buffers.
    """

    def __init__(self, app: AppT, topics: Iterable[str], max_messages: int) -> None:
        self.app = app
        self.topics = frozenset(topics)
        self.max_messages = max_messages
        # Fetches not yet taken, oldest first, each with the loop time it arrived.
        self._fetches: deque[tuple[float, list[Message]]] = deque()
        self._buffered = 0
        self._arrived = asyncio.Event()  # set while something is buffered
        self._room = asyncio.Event()  # set while below max_messages
        self._room.set()
        self._rebalanced = False
        app.flow_control.manage_queue(self)  # type: ignore[arg-type]  # needs only clear()

    @property
    def buffered(self) -> int:
        return self._buffered

    async def put(self, messages: list[Message]) -> None:
        """Buffer one fetch; waits while the sink is full or the app's flow is suspended."""
        flow_control = self.app.flow_control
        await flow_control.acquire()
        while self._buffered >= self.max_messages:
            await self._room.wait()
            await flow_control.acquire()
        self._fetches.append((asyncio.get_running_loop().time(), messages))
        self._buffered += len(messages)
        self._arrived.set()
        if self._buffered >= self.max_messages:
            self._room.clear()

    def clear(self) -> None:
        """Drop what was fetched but not taken (a rebalance re-reads it from the commits)."""
        self._fetches.clear()
        self._buffered = 0
        self._arrived.clear()
        self._room.set()
        self._rebalanced = True

    def rebalanced(self) -> bool:
        """Whether partitions were revoked or assigned since the last call. The worker then
        drops its per-user caches: users of partitions it gave up may be forgotten by their
        new owner, and no copy of theirs may stay in this worker's memory."""
        rebalanced, self._rebalanced = self._rebalanced, False
        return rebalanced

    async def take(
        self, max_messages: int, within: float, flush: asyncio.Event | None = None
    ) -> list[Message]:
        """The next batch, in fetch order: up to ``max_messages``.

        Waits for a first message, then for the batch to fill, at most until the oldest
        buffered message has waited ``within`` seconds, or until ``flush`` is set (the worker
        sets it while no batch is being computed: waiting to fill a batch then only adds
        latency, as nothing else would use the time).
        """
        loop = asyncio.get_running_loop()
        while not self._buffered:
            await self._arrived.wait()
        while self._buffered < max_messages and not (flush is not None and flush.is_set()):
            remaining = self._fetches[0][0] + within - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()  # set again by the next put
            await _first_of(self._arrived, flush, timeout=remaining)
            if not self._buffered:  # cleared by a rebalance meanwhile
                return await self.take(max_messages, within, flush)
        return self._pop(max_messages)

    def _pop(self, max_messages: int) -> list[Message]:
        batch: list[Message] = []
        fetches = self._fetches
        while fetches and len(batch) < max_messages:
            arrived, messages = fetches[0]
            room = max_messages - len(batch)
            if len(messages) <= room:
                batch += messages
                fetches.popleft()
            else:  # the rest stays first, with its arrival time
                batch += messages[:room]
                fetches[0] = (arrived, messages[room:])
        self._buffered -= len(batch)
        if self._buffered:
            self._arrived.set()
        else:
            self._arrived.clear()
        if self._buffered < self.max_messages:
            self._room.set()
        return batch

    def ack(self, messages: Sequence[Message]) -> None:
        """Mark messages processed: faust may commit their offsets from now on."""
        ack = self.app.consumer.ack
        for message in messages:
            ack(message)


async def _first_of(event: asyncio.Event, other: asyncio.Event | None, timeout: float) -> None:
    """Wait until either event is set or ``timeout`` seconds pass."""
    waits = [asyncio.ensure_future(event.wait())]
    if other is not None:
        waits.append(asyncio.ensure_future(other.wait()))
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


class ConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    """faust's consumer thread with a configurable fetch wait (faust hard-codes 1500 ms).

    Why: a fetch that finds no new data waits up to ``fetch_max_wait_ms`` on the broker. Kafka
    ends that wait as soon as data arrives, so there the setting only paces empty polls; the
    embedded broker (Tansu) holds the fetch for the whole wait, so there the wait adds to every
    event's latency.
    """

    def _create_worker_consumer(
        self, transport: aiokafka_driver.Transport
    ) -> aiokafka_driver.aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read when AIOKafkaConsumer.start()s.
        consumer._fetch_max_wait_ms = cast(Transport, transport).fetch_max_wait_ms
        return consumer


@dataclass(slots=True)
class _Delivery:
    batch: list[Message] = field(default_factory=list)  # for the sink
    read_offsets: dict[TP, int] = field(default_factory=dict)  # newest selected, per partition


class Consumer(aiokafka_driver.Consumer):
    """faust's aiokafka consumer, delivering the topics of the app's `FetchSink` per fetch."""

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _fetch(self, timeout: float) -> list[Message]:
        """One fetch as messages, in partition order (faust's ``getmany`` without the
        per-message generator: the checks it makes per message are made once per fetch)."""
        records, active_partitions = await self._wait_next_records(timeout)
        if records is None or self.should_stop:
            return []
        if not self.flow_active:
            # As faust's getmany: a rebalance began while fetching; seek back to what was
            # committed, deliver nothing.
            try:
                await self.perform_seek()
            except Exception as exc:
                self.log.warning(f"exception performing seek when flow not active {exc}")
            return []
        to_message = self._to_message
        messages: list[Message] = []
        for tp, tp_records in records.items():
            if (
                active_partitions is None
                or tp in active_partitions
                or tp in self._buffered_partitions
            ):
                self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                messages.extend(to_message(tp, record) for record in tp_records)
        return messages

    async def _select(self, messages: list[Message], sink_topics: frozenset[str]) -> _Delivery:
        """The fetch's messages not delivered before, as faust's loop selects them (offsets
        at or past the read offset, gaps recorded); other topics' delivered one by one."""
        delivery = _Delivery()
        acks_enabled_for = self.app.topics.acks_enabled_for
        read_offset = self._read_offset
        for message in messages:
            tp, offset = message.tp, message.offset
            r_offset = delivery.read_offsets.get(tp)
            if r_offset is None:
                r_offset = read_offset[tp]
            if r_offset is not None and offset < r_offset:
                continue  # fetched again after a seek: already delivered
            gap = offset - (r_offset or 0)
            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                await self._add_gap(tp, r_offset + 1, offset)
            delivery.read_offsets[tp] = offset
            if message.topic in sink_topics:
                self._unacked_messages.add(message)  # as the conductor does, for wait_empty
                delivery.batch.append(message)
            else:  # not the worker's: faust's own per-message delivery
                await self.wait_first(self.callback(message), self.suspend_flow.wait())
        return delivery

    async def _drain_messages(self, fetcher: Service) -> None:  # pragma: no cover - via tests
        # faust's loop (transport/consumer.py), per fetch instead of per message.
        sink = cast(Transport, self.transport).sink
        sink_topics = sink.topics
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                self.diag.set_flag(CONSUMER_FETCHING)
                # No generation check around the fetch: _fetch waits out a whole rebalance
                # (flow suspended) before it fetches, from positions the rebalance already set.
                # A rebalance that begins after the fetch suspends the flow, so the put below
                # drops the fetch, and the new assignment seeks back to the committed offsets.
                fetched = await self._fetch(timeout=1.0)
                await self.sleep(0)
                if self.should_stop:
                    continue
                delivery = await self._select(fetched, sink_topics)
                del fetched  # unacked messages are weakly tracked: hold them only where needed
                if self._commit_every is not None and self._n_acked >= self._commit_every:
                    self._n_acked = 0
                    await self.commit()
                if delivery.batch:
                    put = await self.wait_first(sink.put(delivery.batch), self.suspend_flow.wait())
                    if put.stopped or self.suspend_flow.is_set():
                        # Stopping, or a rebalance began: the fetch is dropped unprocessed and
                        # unacked (a rebalance clears it from the queue if it got there) and is
                        # read again from the committed offsets.
                        del delivery
                        continue
                for tp, offset in delivery.read_offsets.items():
                    self._read_offset[tp] = offset
                del delivery
                self.diag.unset_flag(CONSUMER_FETCHING)
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
            self.diag.unset_flag(CONSUMER_FETCHING)


class Transport(aiokafka_driver.Transport):
    """faust's aiokafka transport with the consumer above, feeding one sink."""

    Consumer = Consumer

    def __init__(
        self, url: list[Any], app: AppT, *, sink: FetchSink, fetch_max_wait_ms: int
    ) -> None:
        super().__init__(url, app)
        self.sink = sink
        self.fetch_max_wait_ms = fetch_max_wait_ms


def attach_fetch_sink(
    app: AppT, topics: Iterable[str], max_messages: int, fetch_max_wait_ms: int
) -> FetchSink:
    """Make the app consume ``topics`` into a new `FetchSink` and return the sink.

    Call it before anything asks the app for its transport (``app.topic`` does): the app's
    conductor and consumer are made by the transport that is set then.
    """
    sink = FetchSink(app, topics, max_messages)
    app.transport = Transport(
        app.conf.broker_consumer, app, sink=sink, fetch_max_wait_ms=fetch_max_wait_ms
    )
    return sink
