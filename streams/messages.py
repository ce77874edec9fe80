"""What crosses the worker's edges: a message as consumed, a record to publish."""

from __future__ import annotations

import msgspec

from streams.events import Source


class RawMessage(msgspec.Struct, frozen=True, gc=False):
    """An input message as the consumer delivered it, before validation."""

    key: bytes | None
    value: bytes | None
    source: Source


class OutRecord(msgspec.Struct, frozen=True, gc=False):
    """A record for the publisher: a dead letter or a recommendation."""

    topic: str
    key: bytes | None
    value: bytes | None  # None: a tombstone (a forgotten user's recommendations are void)
