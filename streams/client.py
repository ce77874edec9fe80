"""The Python client apps use: `push()` events, iterate `subscribe()` for recommendations,
`forget()` a user.

    from streams.client import InterestClient
    with InterestClient() as client:
        client.push([{"user_id": "u1", "item_id": "i9", "event_type": "click",
                      "timestamp": 1700000000000}])
        for rec in client.subscribe(user="u1", limit=1, timeout=30):
            print(rec["items"])
        forget_id = client.forget("u1")  # again with forget_id=forget_id to retry

Events are sent as given: the worker is the one validator, and sends what it rejects to the
dead letter topic with the reason. Each event is keyed by its user_id, so a user's events stay in
order on one partition.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from kafka.partitioner.default import murmur2

from streams.events import InvalidEvent, require_id
from streams.forget import forget_record
from streams.settings import Settings, load_settings

PURCHASE_TYPES = frozenset({"purchase"})


class ForgetNotAcknowledged(Exception):
    """The broker did not acknowledge every copy of a forget request: retry with its id (a
    new id would be a second request, and the copies already sent would wait for theirs)."""

    def __init__(self, forget_id: str, cause: BaseException) -> None:
        super().__init__(
            f"the broker did not acknowledge forget request {forget_id} "
            f"({type(cause).__name__}); retry with that forget_id"
        )
        self.forget_id = forget_id


def route(settings: Settings, raw: bytes) -> tuple[str, bytes | None]:
    """(topic, key) for one raw event: purchases to the purchases topic, the rest to clicks.

    Unparseable input still goes to the clicks topic (unkeyed) so that it reaches the
    dead letter topic with its reason rather than vanishing on the client.
    """
    try:
        payload = json.loads(raw)
    except ValueError:
        return settings.topic_clicks, None
    if not isinstance(payload, dict):
        return settings.topic_clicks, None
    if "control" in payload:
        # A forget needs a copy on every input topic, in one acknowledged request: forget().
        raise ValueError("a control record is not an event: use `interest forget` or forget()")
    user = payload.get("user_id")
    key = user.encode() if isinstance(user, str) and user else None
    if payload.get("event_type") in PURCHASE_TYPES:
        return settings.topic_purchases, key
    return settings.topic_clicks, key


def encode_event(event: dict[str, Any] | str | bytes) -> bytes:
    if isinstance(event, bytes):
        return event
    if isinstance(event, str):
        return event.encode()
    return json.dumps(event, separators=(",", ":")).encode()


def forget_request(
    settings: Settings, user_id: str, forget_id: str | None = None
) -> tuple[bytes, bytes, str]:
    """(key, value, forget_id) of a forget request the worker will apply; ValueError if not.

    Checked here as the worker will check it, because a request the worker dead-letters would
    still have been acknowledged to the caller: the user id and a given forget_id like an
    event's ids, and the record's size against the event size limit.
    """
    if forget_id is not None:
        try:
            require_id({"forget_id": forget_id}, "forget_id", settings.max_id_length)
        except InvalidEvent as exc:
            raise ValueError(str(exc)) from None
    key, value, forget_id = forget_record(user_id, forget_id, max_id_length=settings.max_id_length)
    if len(value) > settings.max_event_bytes:
        raise ValueError(
            f"forget request is {len(value)} bytes, more than {settings.max_event_bytes}"
        )
    return key, value, forget_id


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, positive) picks for a key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class InterestClient:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or load_settings()
        self._producer: KafkaProducer | None = None

    def __enter__(self) -> InterestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None

    @property
    def producer(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer(
                bootstrap_servers=self.settings.bootstrap_servers,
                acks="all",
                linger_ms=5,
                retries=10,
                max_in_flight_requests_per_connection=1,  # keep a user's events in order
                **self.settings.kafka_client_options(),
            )
        return self._producer

    def push(self, events: Iterable[dict[str, Any] | str | bytes]) -> int:
        """Send events and wait until the broker acknowledged all of them; returns the count."""
        encoded = [encode_event(event) for event in events]
        routes = [route(self.settings, raw) for raw in encoded]  # refuses before sending any
        futures = [
            self.producer.send(topic, value=raw, key=key)
            for (topic, key), raw in zip(routes, encoded, strict=True)
        ]
        self.producer.flush()
        for future in futures:
            future.get(timeout=30)  # raises if any send failed
        return len(futures)

    def forget(self, user_id: str, forget_id: str | None = None) -> str:
        """Ask the worker to forget a user; returns the forget_id once acknowledged.

        A copy goes to every input topic, keyed by the user, so it is in order with the user's
        events on each. Returns only when the broker acknowledged every copy; a retry passes the
        returned forget_id. Nothing is looked up: an unknown user is not an error. ValueError
        for a bad id.
        """
        key, value, forget_id = forget_request(self.settings, user_id, forget_id)
        futures = [
            self.producer.send(topic, value=value, key=key) for topic in self.settings.input_topics
        ]
        self.producer.flush()
        try:
            for future in futures:
                future.get(timeout=30)
        except KafkaError as exc:
            raise ForgetNotAcknowledged(forget_id, exc) from exc
        return forget_id

    def subscribe(
        self,
        user: str | None = None,
        limit: int | None = None,
        timeout: float | None = None,
        from_beginning: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Recommendation events as dicts, new ones only unless from_beginning; a forgotten
        user's tombstone as ``{"user_id": ..., "forgotten": true}``.

        Stops after `limit` events or `timeout` seconds. With `user`, reads only the partition
        that user's key maps to.
        """
        topic = self.settings.topic_recommendations
        consumer = KafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            enable_auto_commit=False,
            **self.settings.kafka_client_options(),
        )
        try:
            partitions = sorted(consumer.partitions_for_topic(topic) or [])
            if not partitions:
                raise RuntimeError(f"topic {topic!r} does not exist; is the stack up?")
            if user is not None:
                partitions = [partition_for_key(user.encode(), len(partitions))]
            assigned = [TopicPartition(topic, p) for p in partitions]
            consumer.assign(assigned)
            if from_beginning:
                consumer.seek_to_beginning(*assigned)
            else:
                consumer.seek_to_end(*assigned)
            for tp in assigned:
                consumer.position(tp)  # resolve now, so nothing published after this is missed
            deadline = None if timeout is None else time.monotonic() + timeout
            yielded = 0
            while limit is None or yielded < limit:
                wait_ms = 500 if deadline is None else int((deadline - time.monotonic()) * 1000)
                if wait_ms <= 0:
                    return
                batches = consumer.poll(timeout_ms=min(wait_ms, 500))
                for records in batches.values():
                    for record in records:
                        event = _recommendation(record.key, record.value)
                        if user is not None and event.get("user_id") != user:
                            continue
                        yield event
                        yielded += 1
                        if limit is not None and yielded >= limit:
                            return
        finally:
            consumer.close()


def _recommendation(key: bytes | None, value: bytes | None) -> dict[str, Any]:
    """A record of the recommendations topic as a dict; a tombstone (a forgotten user's: drop
    everything you kept of theirs) as ``{"user_id": ..., "forgotten": true}``."""
    if value is None:
        return {"user_id": (key or b"").decode(errors="replace"), "forgotten": True}
    return json.loads(value)
