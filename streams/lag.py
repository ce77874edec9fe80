"""Consumer lag of the worker group: committed offset, end offset and lag per partition."""

from __future__ import annotations

import time
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition

from streams.settings import Settings


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # None: the group has committed nothing here yet
    end: int

    @property
    def lag(self) -> int:
        return self.end - (self.committed or 0)


def _end_offsets(
    consumer: KafkaConsumer, partitions: list[TopicPartition]
) -> dict[TopicPartition, int]:
    """ListOffsets(latest), confirmed by the high watermark of a fetch from that offset.

    Kafka answers both the same; some Kafka-protocol brokers (Tansu 0.6) answer ListOffsets with
    the base offset of the last batch, which would show negative lag.
    """
    listed = consumer.end_offsets(partitions)
    consumer.assign(partitions)
    for tp in partitions:
        consumer.seek(tp, listed[tp])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(consumer.highwater(tp) is None for tp in partitions):
        consumer.poll(timeout_ms=200)
    ends = {}
    for tp in partitions:
        highwater = consumer.highwater(tp)
        ends[tp] = max(listed[tp], highwater if highwater is not None else 0)
    return ends


def consumer_lag(settings: Settings) -> list[PartitionLag]:
    # A consumer with the group's id reads its committed offsets without joining the group.
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=settings.group_id,
        enable_auto_commit=False,
        **settings.kafka_client_options(),
    )
    try:
        partitions = [
            TopicPartition(topic, partition)
            for topic in settings.input_topics
            for partition in sorted(consumer.partitions_for_topic(topic) or [])
        ]
        ends = _end_offsets(consumer, partitions)
        rows = []
        for tp in partitions:
            rows.append(PartitionLag(tp.topic, tp.partition, consumer.committed(tp), ends[tp]))
        return rows
    finally:
        consumer.close()
