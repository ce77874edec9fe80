"""BatchPublisher on the real embedded broker: every record once, keyed records where Kafka's
partitioner puts them, in order."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from kafka.partitioner import murmur2

from streams.messages import OutRecord
from streams.publish import BatchPublisher, create_producer
from streams.settings import Settings
from tests.conftest import read_records


async def _publish(settings: Settings, batches: list[list[OutRecord]]) -> None:
    producer = create_producer(settings, client_id="test-publish")
    await producer.start()
    try:
        publisher = BatchPublisher(producer, timeout_seconds=30)
        for records in batches:
            await publisher.publish(records)
    finally:
        await producer.stop()


def test_every_record_arrives_once_in_its_keys_partition_in_order(settings: Settings) -> None:
    topic = settings.topic_recommendations
    # 2 KB values and the smallest record batch allowed (16 KiB): a partition's records fill
    # several batches, sent one after another.
    settings = settings.model_copy(update={"kafka_max_batch_bytes": 16 * 1024})
    records = [
        OutRecord(topic, f"user-{i % 37}".encode(), f"{i:06d}".encode() + b"x" * 2000)
        for i in range(600)
    ]
    dead = [OutRecord(settings.topic_dlq, None, b'{"error": "bad"}') for _ in range(3)]
    asyncio.run(_publish(settings, [records[:250] + dead, records[250:], []]))

    got = read_records(settings, topic, expected=len(records), timeout=30)
    assert sorted(r.value for r in got) == sorted(r.value for r in records)  # each exactly once
    partitions = settings.topic_partitions  # ensure_topics made them
    by_key: dict[bytes, list[tuple[int, int, bytes]]] = defaultdict(list)
    for r in got:
        by_key[r.key].append((r.partition, r.offset, r.value))
    for key, rows in by_key.items():
        # The Java client's rule (kafka-python's own murmur2 here, not the code under test).
        expected_partition = (murmur2(key) & 0x7FFFFFFF) % partitions
        assert {p for p, _, _ in rows} == {expected_partition}
        sent = [r.value for r in records if r.key == key]
        assert [v for _, _, v in sorted(rows)] == sent  # publish order within the key
    assert len(read_records(settings, settings.topic_dlq, expected=3, timeout=10)) == 3


def test_a_micro_batch_goes_out_in_one_produce_request(settings: Settings) -> None:
    """500 recommendation-sized records (~200 KB, ~50 KB a partition). With aiokafka's 16 KiB
    default record batches they would take several requests, one after another."""
    topic = settings.topic_recommendations
    records = [
        OutRecord(topic, f"user-{i}".encode(), f"{i:06d}".encode() + b"r" * 400) for i in range(500)
    ]
    produce_requests: list[str] = []

    async def main() -> None:
        producer = create_producer(settings, client_id="test-publish-requests")
        await producer.start()
        client_send = producer.client.send

        async def counting_send(node_id: int, request: Any, **kw: Any) -> Any:
            if type(request).__name__.startswith("ProduceRequest"):
                produce_requests.append(type(request).__name__)
            return await client_send(node_id, request, **kw)

        producer.client.send = counting_send  # type: ignore[method-assign]
        try:
            await BatchPublisher(producer, timeout_seconds=30).publish(records)
        finally:
            await producer.stop()

    asyncio.run(main())
    assert len(produce_requests) == 1
    got = read_records(settings, topic, expected=len(records), timeout=30)
    assert sorted(r.value for r in got) == sorted(r.value for r in records)
