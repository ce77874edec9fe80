"""Publishing a micro-batch's output: whole Kafka record batches instead of one send per record.

Why: `producer.send()` per record runs a future, a partition lookup, a sensor call and a
debug log in Python, which made publishing a batch's recommendations a large share of the
worker's event-loop time. Here the records of one (topic, partition) are appended to aiokafka's
record-batch builder (C code) and submitted with `send_batch`: one future per batch of records.
The builders hold up to `Settings.kafka_max_batch_bytes`, so a micro-batch's output is one
record batch per partition, sent in one request: aiokafka keeps one pending batch per partition
and one request per broker in flight, so its 16 KiB default took many round trips per
micro-batch under load.

Partitions are chosen as `send()` would choose them (aiokafka's DefaultPartitioner: murmur2 of
the key over all partitions, the Java client's rule), so a user's recommendations keep landing
in one partition, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner, murmur2
from aiokafka.producer.message_accumulator import BatchBuilder

from streams.messages import OutRecord
from streams.settings import Settings


class Publisher(Protocol):
    """Where a batch's output goes; the pipeline sees only this."""

    async def publish(self, records: Sequence[OutRecord]) -> None:
        """Send all records and return once the broker acknowledged every one."""


def create_producer(settings: Settings, client_id: str) -> AIOKafkaProducer:
    """The worker's producer: acknowledged by all in-sync replicas, as faust's default."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=client_id,
        acks="all",
        max_batch_size=settings.kafka_max_batch_bytes,
        **settings.kafka_client_options(),  # type: ignore[arg-type]
    )


# Keys whose murmur2 hash is remembered (aiokafka's murmur2 is pure Python, and
# the same users recur batch after batch); the memo is dropped whole when full.
HASH_MEMO_KEYS = 100_000


class BatchPublisher:
    """Sends all records of a call and returns once the broker acknowledged every one."""

    def __init__(self, producer: AIOKafkaProducer, timeout_seconds: float) -> None:
        self.producer = producer
        self.timeout_seconds = timeout_seconds
        self._partitioner = DefaultPartitioner()  # for records without a key
        self._hashes: dict[bytes, int] = {}

    def partition(self, key: bytes | None, partitions: list[int]) -> int:
        """The partition `producer.send()` would pick (DefaultPartitioner), the hash memoised."""
        if key is None:
            return self._partitioner(key, partitions, partitions)
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= HASH_MEMO_KEYS:
                self._hashes.clear()
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return partitions[hashed % len(partitions)]

    async def publish(self, records: Sequence[OutRecord]) -> None:
        producer = self.producer
        partitions = {
            topic: sorted(await producer.partitions_for(topic))
            for topic in {record.topic for record in records}
        }
        pending: list[asyncio.Future[object]] = []
        open_batches: dict[tuple[str, int], BatchBuilder] = {}
        for record in records:
            topic, key, value = record.topic, record.key, record.value
            tp = (topic, self.partition(key, partitions[topic]))
            batch = open_batches.get(tp)
            if batch is not None and batch.append(timestamp=None, key=key, value=value):
                continue
            if batch is not None:  # full: send it, start the next one
                pending.append(await producer.send_batch(batch, topic, partition=tp[1]))
            batch = open_batches[tp] = producer.create_batch()
            # A fresh batch takes any one record (records here are bounded by top_k and the
            # DLQ's raw_max_bytes, far below a request's size limit).
            batch.append(timestamp=None, key=key, value=value)
        for (topic, partition), batch in open_batches.items():
            pending.append(await producer.send_batch(batch, topic, partition=partition))
        if pending:
            # A lost acknowledgement must not stall the worker: time out and retry the batch.
            await asyncio.wait_for(asyncio.gather(*pending), self.timeout_seconds)
