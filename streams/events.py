"""Input event validation: raw Kafka bytes in, a typed `Event` or a `Rejection` with its reason.

Pure functions, no I/O: the worker routes a `Rejection` to the dead letter topic and nothing else
happens to it.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson

from encoder.features import EVENT_TYPES

# Epoch milliseconds between 1990 and 2200: catches seconds-vs-millis mistakes and garbage.
MIN_TIMESTAMP_MS = 631_152_000_000
MAX_TIMESTAMP_MS = 7_258_118_400_000
TS = "bad_timestamp"
CONTROL = "bad_control"


# Why dead letters carry a reason code as well as the message: operators count them by code
# (interest_dlq_total{reason}, the monitor's page), and a message names values.
DLQ_REASONS = (
    "empty",
    "too_large",
    "not_json",
    "bad_field",
    "bad_timestamp",
    "bad_event_type",
    "key_mismatch",
    "bad_control",
)
# The control records the validator recognises (streams/forget.py makes them).
FORGET = "forget"


# The per-event records here and in streams/recommend.py and streams/messages.py are frozen
# msgspec Structs, not frozen dataclasses: several are built per event, and a frozen dataclass
# sets each field through object.__setattr__, several times slower.
# gc=False where the fields are scalars only: such a record can never be part of a cycle.
class Source(msgspec.Struct, frozen=True, gc=False):
    """Where a message came from; the unit of idempotence is (topic, partition, offset)."""

    topic: str
    partition: int
    offset: int
    # The record's Kafka timestamp (epoch ms; None where the broker gave none): when the event
    # reached the input topic, where its latency to a recommendation starts.
    timestamp_ms: int | None = None


class Event(msgspec.Struct, frozen=True):
    event_id: str
    user_id: str
    item_id: str
    event_type: str
    timestamp_ms: int
    source: Source
    properties: dict[str, Any] = msgspec.field(default_factory=dict)


class Forget(msgspec.Struct, frozen=True, gc=False):
    """A control record: forget everything about ``user_id`` up to here (streams/forget.py)."""

    user_id: str
    forget_id: str
    source: Source


class Rejection(msgspec.Struct, frozen=True):
    error: str  # for a person: what is wrong, with the value
    source: Source
    raw: bytes
    reason: str = "not_json"  # one of DLQ_REASONS

    def dlq_record(self, raw_max_bytes: int) -> dict[str, Any]:
        """The dead-letter payload: reason, origin, and the raw bytes (truncated, lossless text)."""
        return {
            "error": self.error,
            "reason": self.reason,
            "topic": self.source.topic,
            "partition": self.source.partition,
            "offset": self.source.offset,
            "raw": self.raw[:raw_max_bytes].decode("utf-8", errors="backslashreplace"),
            "raw_truncated": len(self.raw) > raw_max_bytes,
        }


class InvalidEvent(ValueError):
    """Raised inside validation; its message becomes the dead letter's error, ``reason`` its
    code (one of DLQ_REASONS)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_timestamp(value: object) -> int:
    """Epoch milliseconds (int) or an ISO-8601 string (naive means UTC) -> epoch milliseconds."""
    if isinstance(value, bool):
        raise InvalidEvent("timestamp must be epoch milliseconds or an ISO-8601 string", TS)
    if isinstance(value, int):
        millis = value
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise InvalidEvent("timestamp must be whole epoch milliseconds", TS)
        millis = int(value)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidEvent(f"unparseable timestamp {value[:40]!r}", TS) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        millis = int(parsed.timestamp() * 1000)
    else:
        raise InvalidEvent("timestamp must be epoch milliseconds or an ISO-8601 string", TS)
    if not MIN_TIMESTAMP_MS <= millis <= MAX_TIMESTAMP_MS:
        raise InvalidEvent(
            f"timestamp {millis} is not epoch milliseconds between 1990 and 2200", TS
        )
    return millis


def require_id(payload: dict[str, Any], name: str, max_length: int) -> str:
    value = payload.get(name)
    if not isinstance(value, str):
        raise InvalidEvent(f"{name} must be a string", "bad_field")
    if not value.strip():
        raise InvalidEvent(f"{name} must not be empty", "bad_field")
    if len(value) > max_length:
        raise InvalidEvent(f"{name} is longer than {max_length} characters", "bad_field")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
        raise InvalidEvent(f"{name} is not valid Unicode", "bad_field") from None
    return value


def parse_event(
    raw: bytes, source: Source, *, max_id_length: int, max_event_bytes: int
) -> Event | Forget:
    """Validate one message; raises InvalidEvent with a human-readable reason."""
    if len(raw) > max_event_bytes:
        raise InvalidEvent(f"event is {len(raw)} bytes, more than {max_event_bytes}", "too_large")
    try:
        # orjson rejects what the contract forbids: bad UTF-8, NaN/Infinity, lone surrogates.
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        reason = str(exc)
        if "UTF-8" in reason:
            raise InvalidEvent("event is not valid UTF-8", "not_json") from None
        if "surrogate" in reason:
            raise InvalidEvent("event is not valid Unicode (lone surrogate)", "not_json") from None
        if b"NaN" in raw or b"Infinity" in raw:
            raise InvalidEvent(
                "non-finite number (NaN or Infinity) is not allowed", "not_json"
            ) from None
        raise InvalidEvent(f"event is not JSON: {reason}", "not_json") from None
    if not isinstance(payload, dict):
        raise InvalidEvent("event must be a JSON object", "not_json")
    if "control" in payload:
        return parse_control(payload, source, max_id_length)

    user_id = require_id(payload, "user_id", max_id_length)
    item_id = require_id(payload, "item_id", max_id_length)
    event_type = payload.get("event_type")
    if event_type not in EVENT_TYPES:
        raise InvalidEvent(f"event_type must be one of {', '.join(EVENT_TYPES)}", "bad_event_type")
    if "timestamp" not in payload:
        raise InvalidEvent("timestamp is missing", TS)
    timestamp_ms = parse_timestamp(payload["timestamp"])
    if payload.get("event_id") is None:
        event_id = f"{source.topic}/{source.partition}/{source.offset}"
    else:
        event_id = require_id(payload, "event_id", max_id_length)
    properties = payload.get("properties") or {}
    if not isinstance(properties, dict):
        raise InvalidEvent("properties must be a JSON object", "bad_field")
    return Event(event_id, user_id, item_id, event_type, timestamp_ms, source, properties)


def parse_control(payload: dict[str, Any], source: Source, max_id_length: int) -> Forget:
    """A control record: the only kind is a forget request."""
    if payload["control"] != FORGET:
        raise InvalidEvent(f"unknown control record {str(payload['control'])[:40]!r}", CONTROL)
    try:
        user_id = require_id(payload, "user_id", max_id_length)
        forget_id = require_id(payload, "forget_id", max_id_length)
    except InvalidEvent as exc:
        raise InvalidEvent(f"forget request: {exc}", CONTROL) from None
    return Forget(user_id, forget_id, source)


def validate(
    raw: bytes | None, source: Source, *, max_id_length: int, max_event_bytes: int
) -> Event | Forget | Rejection:
    if raw is None:
        return Rejection("event is empty (null value)", source, b"", "empty")
    try:
        return parse_event(
            raw, source, max_id_length=max_id_length, max_event_bytes=max_event_bytes
        )
    except InvalidEvent as exc:
        return Rejection(str(exc), source, raw, exc.reason)
