"""`InterestClient.forget` against the real embedded broker: one copy of the control record per
input topic, keyed by the user and on the partition that user's events use, so the worker meets
it in order with them; bad ids send nothing."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from kafka.consumer.fetcher import ConsumerRecord

from streams.client import InterestClient
from streams.settings import Settings
from tests.conftest import read_records

USERS = ("ana", "bo", "cy", "dee", "eve", "fay")


def event(user: str, kind: str) -> dict[str, Any]:
    return {
        "user_id": user,
        "item_id": "i1",
        "event_type": kind,
        "timestamp": 1_700_000_000_000,
    }


def forgets(records: list[ConsumerRecord]) -> list[ConsumerRecord]:
    return [r for r in records if json.loads(r.value).get("control") == "forget"]


def event_partitions(records: list[ConsumerRecord]) -> dict[str, int]:
    """user -> the partition that user's (non-control) events landed on."""
    return {
        json.loads(r.value)["user_id"]: r.partition
        for r in records
        if "control" not in json.loads(r.value)
    }


def assert_forget_copies(
    settings: Settings, expected_ids: dict[str, list[str]], since_ms: int
) -> None:
    """Each input topic holds, per user, exactly the forgets `expected_ids` names, in that order,
    keyed by the user, on the partition the user's pushed event landed on there."""
    copies = sum(len(ids) for ids in expected_ids.values())
    users_total = len(expected_ids)
    for topic in settings.input_topics:
        records = read_records(settings, topic, users_total + copies)
        partitions = event_partitions(records)
        assert set(partitions) == set(expected_ids)
        assert len(set(partitions.values())) > 1  # users spread, so a fixed partition would show
        found: dict[str, list[str]] = {}
        for record in sorted(forgets(records), key=lambda r: (r.partition, r.offset)):
            value = json.loads(record.value)
            user = value["user_id"]
            assert record.key == user.encode()
            assert record.partition == partitions[user], (topic, user)
            assert set(value) == {"control", "user_id", "forget_id", "requested_at"}
            assert since_ms <= value["requested_at"] <= int(time.time() * 1000)
            found.setdefault(user, []).append(value["forget_id"])
        assert found == expected_ids, topic


def test_forget_sends_one_copy_per_input_topic_on_the_users_partition(settings: Settings) -> None:
    since_ms = int(time.time() * 1000)
    with InterestClient(settings) as client:
        client.push([event(user, kind) for user in USERS for kind in ("click", "purchase")])
        first = {user: client.forget(user) for user in USERS}
        retried = client.forget("ana", forget_id=first["ana"])
        chosen = client.forget("bo", forget_id="my-request-1")

    assert retried == first["ana"]
    assert chosen == "my-request-1"
    assert all(len(f) == 32 and int(f, 16) >= 0 for f in first.values())  # uuid4 hex
    assert len(set(first.values())) == len(USERS)
    expected = {user: [first[user]] for user in USERS}
    expected["ana"].append(first["ana"])
    expected["bo"].append("my-request-1")
    assert_forget_copies(settings, expected, since_ms)


def test_an_unknown_user_is_not_an_error(settings: Settings) -> None:
    with InterestClient(settings) as client:
        forget_id = client.forget("never-seen")
    for topic in settings.input_topics:
        records = read_records(settings, topic, 1)
        assert [(r.key, json.loads(r.value)["forget_id"]) for r in records] == [
            (b"never-seen", forget_id)
        ]


BAD = [
    ("", None, "user_id must not be empty"),
    ("   ", None, "user_id must not be empty"),
    ("x" * 9, None, "user_id is longer than 8 characters"),
    ("\ud800", None, "user_id is not valid Unicode"),
    ("ana", " ", "forget_id must not be empty"),
    ("ana", "", "forget_id must not be empty"),
    ("ana", "f" * 9, "forget_id is longer than 8 characters"),
]


def test_a_bad_id_raises_and_sends_nothing(settings: Settings) -> None:
    short = settings.model_copy(update={"max_id_length": 8})
    with InterestClient(short) as client:
        for user, forget_id, reason in BAD:
            with pytest.raises(ValueError, match=f"^{reason}$"):
                client.forget(user, forget_id)
        client.forget("marker")  # once the marker is on the topics, anything sent would be too
    for topic in settings.input_topics:
        assert [r.key for r in read_records(settings, topic, 1)] == [b"marker"]


def test_subscribers_see_a_forgotten_users_tombstone(settings: Settings) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    producer.send(settings.topic_recommendations, key=b"gone", value=None)
    producer.flush()
    producer.close()
    with InterestClient(settings) as client:
        seen = list(client.subscribe(user="gone", limit=1, timeout=20, from_beginning=True))
    assert seen == [{"user_id": "gone", "forgotten": True}]


def test_push_refuses_a_control_record_and_sends_nothing_of_its_batch(settings: Settings) -> None:
    from streams.forget import forget_record

    _, value, _ = forget_record("u1")
    event = {"user_id": "u1", "item_id": "i", "event_type": "click", "timestamp": 1_767_225_600_000}
    before = len(read_records(settings, settings.topic_clicks))
    with InterestClient(settings) as client, pytest.raises(ValueError, match="control record"):
        client.push([event, value])
    assert len(read_records(settings, settings.topic_clicks)) == before
