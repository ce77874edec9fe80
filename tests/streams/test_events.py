import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.events import DLQ_REASONS, Event, Rejection, Source, parse_timestamp, validate

SOURCE = Source("clicks", 2, 41)


def check(raw: bytes | None, **limits: int) -> Event | Rejection:
    return validate(
        raw,
        SOURCE,
        max_id_length=limits.get("max_id_length", 64),
        max_event_bytes=limits.get("max_event_bytes", 4096),
    )


def event(**fields: object) -> bytes:
    base = {"user_id": "u1", "item_id": "i1", "event_type": "click", "timestamp": 1_700_000_000_000}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def test_valid_event_is_parsed_and_event_id_derived_from_position() -> None:
    result = check(event(properties={"price": 3}))
    assert isinstance(result, Event)
    assert (result.user_id, result.item_id, result.event_type) == ("u1", "i1", "click")
    assert result.timestamp_ms == 1_700_000_000_000
    assert result.event_id == "clicks/2/41"
    assert result.properties == {"price": 3}


def test_explicit_event_id_and_iso_timestamp() -> None:
    result = check(event(event_id="e-7", timestamp="2023-11-14T22:13:20Z"))
    assert isinstance(result, Event)
    assert result.event_id == "e-7"
    assert result.timestamp_ms == 1_700_000_000_000
    naive = check(event(timestamp="2023-11-14T22:13:20"))
    assert isinstance(naive, Event) and naive.timestamp_ms == 1_700_000_000_000


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b"\xff\xfe{}", "UTF-8"),
        (event(user_id=7), "user_id must be a string"),
        (event(user_id=""), "user_id must not be empty"),
        (event(item_id="   "), "item_id must not be empty"),
        (event(item_id="x" * 65), "longer than 64"),
        (event(user_id=...), "user_id must be a string"),
        (event(event_type="like"), "event_type must be one of"),
        (event(timestamp="yesterday"), "unparseable timestamp"),
        (event(timestamp=1_700_000_000), "between 1990 and 2200"),
        (event(timestamp=True), "epoch milliseconds"),
        (event(timestamp=...), "timestamp is missing"),
        (event(timestamp=1.5), "whole epoch milliseconds"),
        (b'{"user_id":"u","item_id":"i","event_type":"click","timestamp":NaN}', "non-finite"),
        (event(properties=[1]), "properties must be a JSON object"),
        (event(event_id=""), "event_id must not be empty"),
        (None, "empty"),
    ],
)
def test_invalid_events_are_rejected_with_reason(raw: bytes | None, reason: str) -> None:
    result = check(raw)
    assert isinstance(result, Rejection)
    assert reason in result.error
    assert result.source == SOURCE


def test_oversized_event_rejected_and_dlq_record_truncated() -> None:
    raw = event(properties={"blob": "x" * 5000})
    result = check(raw)
    assert isinstance(result, Rejection)
    assert "bytes, more than 4096" in result.error
    record = result.dlq_record(raw_max_bytes=100)
    assert record["raw_truncated"] is True
    assert len(record["raw"]) == 100
    assert (record["topic"], record["partition"], record["offset"]) == ("clicks", 2, 41)


def test_dlq_record_keeps_bad_bytes_visible() -> None:
    result = check(b"\xff{")
    assert isinstance(result, Rejection)
    assert result.dlq_record(100)["raw"] == "\\xff{"


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    assert isinstance(check(raw), Event | Rejection)


@given(st.integers(min_value=631_152_000_000, max_value=7_258_118_400_000))
def test_epoch_millis_round_trip(millis: int) -> None:
    assert parse_timestamp(millis) == millis


def test_lone_surrogate_ids_are_rejected() -> None:
    result = check(
        b'{"user_id":"\\ud800","item_id":"i","event_type":"click","timestamp":1700000000000}'
    )
    assert isinstance(result, Rejection)
    assert "not valid Unicode" in result.error


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty"),
        (event(properties={"blob": "x" * 5000}), "too_large"),
        (b"{not json", "not_json"),
        (b"\xff{", "not_json"),
        (b"[1, 2]", "not_json"),
        (event(user_id=""), "bad_field"),
        (event(item_id=7), "bad_field"),
        (event(properties=[1]), "bad_field"),
        (event(timestamp=...), "bad_timestamp"),
        (event(timestamp=12), "bad_timestamp"),
        (event(event_type="like"), "bad_event_type"),
    ],
)
def test_each_rejection_carries_its_reason_code(raw: bytes | None, reason: str) -> None:
    result = check(raw)
    assert isinstance(result, Rejection)
    assert result.reason == reason and reason in DLQ_REASONS
    assert result.dlq_record(100)["reason"] == reason
