"""Forgetting a user: the control record an app sends, in order with the user's events.

Why a record on the input topics rather than a call to Redis: the worker applies a user's input
in partition order, so a forget travels behind every event sent before it and ahead of every
event sent after it. A copy goes to each input topic (the user's partition of each), so events
already in flight on either topic can never put old history back: after the first copy, the
user's events from a topic whose copy has not arrived yet were sent before the request and are
dropped (streams/window.py, `ForgetMark`).

    key   = the user id
    value = {"control": "forget", "user_id": ..., "forget_id": ..., "requested_at": epoch ms}
"""

from __future__ import annotations

import time
import uuid

import orjson

from streams.events import FORGET, InvalidEvent, require_id


def forget_record(
    user_id: str, forget_id: str | None = None, now_ms: int | None = None, max_id_length: int = 256
) -> tuple[bytes, bytes, str]:
    """(key, value, forget_id) of a forget request; ValueError for a bad user id.

    ``forget_id``: a retry of one request passes the id it got the first time (applying one
    forget twice is harmless either way)."""
    try:
        user = require_id({"user_id": user_id}, "user_id", max_id_length)
    except InvalidEvent as exc:
        raise ValueError(str(exc)) from None
    forget_id = forget_id or uuid.uuid4().hex
    value = {
        "control": FORGET,
        "user_id": user,
        "forget_id": forget_id,
        "requested_at": int(time.time() * 1000) if now_ms is None else now_ms,
    }
    return user.encode(), orjson.dumps(value), forget_id
