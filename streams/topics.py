"""Create the service's topics (idempotent). Partitioned so a consumer group can spread users."""

from __future__ import annotations

import contextlib

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from common.errors import UserError
from streams.settings import Settings


def admin_client(settings: Settings) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=f"{settings.group_id}-admin",
            request_timeout_ms=10_000,
            **settings.kafka_client_options(),
        )
    except KafkaError:  # kafka-python 3 raises a timeout when no broker answers
        raise UserError(
            f"no Kafka broker answers at {settings.bootstrap_servers}; "
            "start the dev stack with `interest up` or set INTEREST_BOOTSTRAP_SERVERS"
        ) from None


def ensure_topics(settings: Settings) -> list[str]:
    """Create any missing service topic; returns the names that were created."""
    wanted = [
        settings.topic_clicks,
        settings.topic_purchases,
        settings.topic_recommendations,
        settings.topic_dlq,
    ]
    admin = admin_client(settings)
    try:
        existing = set(admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if missing:
            topics = [
                NewTopic(name, settings.topic_partitions, settings.topic_replication)
                for name in missing
            ]
            with contextlib.suppress(TopicAlreadyExistsError):  # another process won the race
                admin.create_topics(topics)
        _check_copartitioned(admin, settings)
        return missing
    finally:
        admin.close()


def _check_copartitioned(admin: KafkaAdminClient, settings: Settings) -> None:
    """Clicks and purchases must have the same partition count: the consumer group assigns
    equal partition numbers of both to one worker, which keeps each user on one worker."""
    counts = {
        topic["name"]: len(topic["partitions"])
        for topic in admin.describe_topics(list(settings.input_topics))
    }
    if len(set(counts.values())) > 1:
        raise UserError(
            f"input topics must have the same number of partitions, found {counts}; "
            "a user's clicks and purchases would be processed by different workers"
        )
