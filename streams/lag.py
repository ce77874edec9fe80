"""Consumer lag of a group: committed offset, end offset, lag in messages and in time.

`OffsetReader` keeps two kafka-python clients open (an admin client for the group's committed
offsets, and a consumer with no group for end offsets and record timestamps), so a watcher
polling every few seconds does not reconnect each time. Neither joins the group: reading lag
never disturbs the workers. `interest lag` reads once; `interest lag --watch` and `interest
monitor` read on an interval through streams/monitor/.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from common.errors import UserError
from streams.settings import Settings

# Longest one read waits for the broker to hand over what it needs (the records at the
# committed offsets, the high watermarks): a slow partition leaves its value unknown instead.
READ_WAIT_SECONDS = 2.0


class KafkaUnreachable(UserError):
    """The cluster in the settings could not be reached or did not answer."""


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # None: the group has committed nothing here yet
    end: int
    # Kafka timestamp (epoch ms) of the oldest unprocessed record, the one at the committed
    # offset; None when nothing is waiting or it could not be read.
    oldest_waiting_ms: int | None = None

    start: int = 0  # where the lag counts from without a commit: the oldest record kept

    @property
    def lag(self) -> int:
        return max(0, self.end - (self.committed if self.committed is not None else self.start))

    def lag_seconds(self, now_ms: int) -> float | None:
        """Age of the oldest unprocessed event: 0 with no lag, None where it is unknown."""
        if self.lag == 0:
            return 0.0
        if self.oldest_waiting_ms is None:
            return None
        return max(0.0, (now_ms - self.oldest_waiting_ms) / 1000)


class OffsetReader:
    """Reads groups' lag and topics' end offsets from one cluster (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        options = {
            "bootstrap_servers": settings.bootstrap_servers,
            "request_timeout_ms": 10_000,
            # A wrong address is told in seconds, not after kafka-python's 30 s default.
            "bootstrap_timeout_ms": 5_000,
            **settings.kafka_client_options(),
        }
        admin = None
        try:
            admin = KafkaAdminClient(**options)
            self._consumer = KafkaConsumer(
                enable_auto_commit=False, auto_offset_reset="earliest", **options
            )
            self._admin = admin
        except KafkaError as exc:
            if admin is not None:
                admin.close()
            raise KafkaUnreachable(
                f"cannot reach Kafka at {settings.bootstrap_servers} ({type(exc).__name__})"
            ) from None

    def close(self) -> None:
        self._consumer.close()
        self._admin.close()

    def partitions(self, topics: Sequence[str]) -> list[TopicPartition]:
        """Every partition of the topics that exist (a missing topic has none)."""
        return [
            TopicPartition(topic, partition)
            for topic in topics
            for partition in sorted(self._consumer.partitions_for_topic(topic) or [])
        ]

    def committed(self, group: str) -> dict[TopicPartition, int]:
        """The group's committed offsets; empty for a group that has committed nothing."""
        offsets = self._admin.list_group_offsets(group).get(group, {})
        return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}

    def members(self, group: str) -> int | None:
        """How many consumers the group has now; None where the broker does not say."""
        try:
            (described,) = self._admin.describe_groups([group])
        except (KafkaError, ValueError):  # ValueError: a broker's answer kafka-python misreads
            return None
        return len(described.members)

    def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """ListOffsets(latest), confirmed by the high watermark of a fetch from that offset.

        Kafka answers both the same; some Kafka-protocol brokers (Tansu) answer ListOffsets
        with the base offset of the last record batch, which would show a lag that is not there.
        """
        if not partitions:
            return {}
        consumer = self._consumer
        listed = consumer.end_offsets(list(partitions))
        consumer.assign(list(partitions))
        for tp in partitions:
            consumer.seek(tp, listed[tp])
        deadline = time.monotonic() + READ_WAIT_SECONDS
        while time.monotonic() < deadline and any(
            consumer.highwater(tp) is None for tp in partitions
        ):
            consumer.poll(timeout_ms=100)
        return {tp: max(listed[tp], consumer.highwater(tp) or 0) for tp in partitions}

    def oldest_waiting(self, waiting: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Kafka timestamp (epoch ms) of the record at each given offset, where it arrives in
        time; a partition missing from the answer is unknown."""
        if not waiting:
            return {}
        consumer = self._consumer
        consumer.assign(list(waiting))
        for tp, offset in waiting.items():
            consumer.seek(tp, offset)
        found: dict[TopicPartition, int] = {}
        deadline = time.monotonic() + READ_WAIT_SECONDS
        while time.monotonic() < deadline and len(found) < len(waiting):
            for tp, records in consumer.poll(timeout_ms=100).items():
                first = next((r for r in records if r.offset >= waiting[tp]), None)
                if tp not in found and first is not None and first.timestamp >= 0:
                    found[tp] = first.timestamp
                    consumer.pause(tp)  # found: stop fetching it
        consumer.resume(*consumer.paused())
        return found

    def group_lag(self, group: str, topics: Sequence[str]) -> list[PartitionLag]:
        """Per partition of ``topics``: the group's committed offset, the end offset, and the
        timestamp of the oldest record still waiting."""
        partitions = self.partitions(topics)
        ends = self.end_offsets(partitions)
        committed = self.committed(group)
        # Where nothing is committed, the group starts at the oldest record still kept (a
        # cluster's retention may have deleted the first ones).
        starts = self._consumer.beginning_offsets([tp for tp in partitions if tp not in committed])
        base = {tp: committed.get(tp, starts.get(tp, 0)) for tp in partitions}
        waiting = {tp: base[tp] for tp in partitions if ends[tp] > base[tp]}
        oldest = self.oldest_waiting(waiting)
        return [
            PartitionLag(
                tp.topic, tp.partition, committed.get(tp), ends[tp], oldest.get(tp), base[tp]
            )
            for tp in partitions
        ]


def consumer_lag(settings: Settings) -> list[PartitionLag]:
    """The worker group's lag on the input topics, read once."""
    reader = OffsetReader(settings)
    try:
        return reader.group_lag(settings.group_id, settings.input_topics)
    finally:
        reader.close()
