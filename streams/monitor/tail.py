"""What the workers publish, read back from the output topics: latency, model versions in use,
dead letters by reason.

Why read the topics instead of the workers' metrics: the topics hold every worker's output, on
any cluster, with nothing to configure per worker. Each recommendation payload carries
``received_at`` (its event's Kafka timestamp) and ``generated_at``, so its latency through the
workers is read off the payload. Recommendations are sampled: the tail reads at most
``max_records`` per poll and skips ahead when it falls further behind than that, so the
monitor never competes with the workers for the CPU; rates come from end offsets instead
(streams/monitor/collector.py). Dead letters are few and all read.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import orjson
from kafka import KafkaConsumer, TopicPartition

from streams.settings import Settings


@dataclass(frozen=True, slots=True)
class Output:
    """One recommendation as the tail saw it."""

    at_ms: int  # generated_at
    latency_ms: float | None  # generated_at - received_at; None without received_at
    model_version: str


class OutputTail:
    """Keeps the last ``window_seconds`` of sampled recommendations and of dead letters."""

    def __init__(
        self, settings: Settings, window_seconds: float = 60.0, max_records: int = 5_000
    ) -> None:
        self.settings = settings
        self.window_ms = int(window_seconds * 1000)
        self.max_records = max_records
        self.outputs: deque[Output] = deque()
        self.dead_letters: deque[tuple[int, str]] = deque()  # (record timestamp ms, reason)
        self._consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers,
            enable_auto_commit=False,
            bootstrap_timeout_ms=5_000,
            max_poll_records=max_records,
            **settings.kafka_client_options(),
        )
        self._assigned = False

    def close(self) -> None:
        self._consumer.close()

    def poll(self, now_ms: int) -> None:
        """Read what arrived since the last poll (from the end, the first time)."""
        consumer = self._consumer
        if not self._assigned and not self._assign():
            return
        self._skip_ahead()
        for tp, records in consumer.poll(timeout_ms=200).items():
            if tp.topic == self.settings.topic_dlq:
                self.dead_letters.extend((r.timestamp, _reason(r.value)) for r in records)
            else:
                self.outputs.extend(o for o in map(_output, (r.value for r in records)) if o)
        self._forget(now_ms)

    def _assign(self) -> bool:
        """Start at the end of every partition of the two topics (False: none exist yet)."""
        consumer = self._consumer
        topics = (self.settings.topic_recommendations, self.settings.topic_dlq)
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or [])
        ]
        if not partitions:
            return False
        consumer.assign(partitions)
        consumer.seek_to_end(*partitions)
        self._assigned = True
        return True

    def _skip_ahead(self) -> None:
        """A recommendations partition further behind than one poll's worth: jump close to
        its end (a sample of the newest is what the window needs)."""
        consumer = self._consumer
        partitions = [
            tp for tp in consumer.assignment() if tp.topic == self.settings.topic_recommendations
        ]
        ends = consumer.end_offsets(partitions)
        for tp in partitions:
            if ends[tp] - consumer.position(tp) > self.max_records:
                consumer.seek(tp, ends[tp] - self.max_records // max(1, len(partitions)))

    def _forget(self, now_ms: int) -> None:
        oldest = now_ms - self.window_ms
        while self.outputs and self.outputs[0].at_ms < oldest:
            self.outputs.popleft()
        while self.dead_letters and self.dead_letters[0][0] < oldest:
            self.dead_letters.popleft()


def _output(value: bytes | None) -> Output | None:
    """A recommendation payload as an `Output`; None for one that is not a payload (a
    tombstone, or another producer's record)."""
    try:
        payload = orjson.loads(value or b"null")
        generated = int(payload["generated_at"])
        received = payload.get("received_at")
        latency = float(generated - received) if isinstance(received, int) else None
        return Output(generated, latency, str(payload["model_version"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _reason(value: bytes | None) -> str:
    """A dead letter's reason code ("unknown" for one written without a code)."""
    try:
        reason = orjson.loads(value or b"null").get("reason")
    except (orjson.JSONDecodeError, AttributeError):
        return "unknown"
    return reason if isinstance(reason, str) else "unknown"
