"""The encoder recommender in a child process of the worker, behind the `Recommender` interface.

Why a process: with the encoder in a thread, the worker was one core of Python shared by two
threads (the event loop: validation, windows, Redis, Kafka; the inference thread: the
recommender), while the machine's second core sat mostly idle (bench/README.md, "Streaming").
Here the child runs `EncoderRecommender` as is, under a GIL of its own; the worker's thread
only encodes the batch, waits on a pipe (no GIL held) and decodes the result.

What crosses the pipe is kept small: windows are O(window) per user, so the child keeps each
user's window as it was after the last batch it computed, and the parent sends a user's window
only when the child does not hold it at the signature (offsets JSON) the batch starts from. The
parent decides what the child keeps (an LRU of `cache_users`) and tells it what to forget, so
both sides agree without a round trip. Per request only the event's window entry and the
window's length after it cross; the child rebuilds the window (the length and age limits only
ever drop the oldest entries), and an event inserted out of time order sends its whole window.
The child then hands `EncoderRecommender.recommend` the same `Batch` the worker built, so the
two give the same result (tests/streams/test_inference_process.py compares them).

If the child dies, the batch fails and the worker exits without acking (it replays on restart).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import traceback
from collections import OrderedDict
from multiprocessing.connection import Connection
from pathlib import Path

import msgspec

from streams.events import Event, Source
from streams.recommend import Batch, ModelUpdate, Recommendation, Request, Result, StoredModelState
from streams.window import WindowEntry

log = logging.getLogger(__name__)

# The child rebuilds events from window entries; it reads no source (only the worker does).
_NO_SOURCE = Source("", 0, 0)


class UserIn(msgspec.Struct, array_like=True, gc=False):
    user_id: str
    prior_signature: bytes
    final_signature: bytes
    stored: StoredModelState
    # The window before the batch; None when the child holds it at prior_signature.
    prior_window: list[WindowEntry] | None


class RequestIn(msgspec.Struct, array_like=True, gc=False):
    user_id: str
    entry: WindowEntry  # the event, as the window keeps it
    window_length: int  # of the window right after the event
    window: list[WindowEntry] | None = None  # the whole window, for an event not appended


class BatchIn(msgspec.Struct, array_like=True):
    users: list[UserIn]
    requests: list[RequestIn]
    popular: list[tuple[str, float]]
    k: int
    forget: list[str]  # users the child drops after this batch (the parent's LRU evicted them)


class ResultOut(msgspec.Struct, array_like=True, tag=True):
    recommendations: list[Recommendation]
    updates: dict[str, ModelUpdate]


class Ready(msgspec.Struct, array_like=True, tag=True):
    model_version: str
    provider: str
    receptive_field: int


class Failed(msgspec.Struct, array_like=True, tag=True):
    error: str


class InferenceProcessError(RuntimeError):
    """The child failed to load the model, failed on a batch, or is gone."""


# ---------------------------------------------------------------------------- parent side


def slim_batch(batch: Batch, held: OrderedDict[str, bytes], capacity: int) -> BatchIn:
    """The batch as it crosses the pipe, given what the child holds; updates ``held`` (the
    parent's copy of the child's LRU: user -> signature of the window it holds) for after it."""
    users: list[UserIn] = []
    requests: list[RequestIn] = []
    listed: set[str] = set()
    for request in batch.requests:
        event = request.event
        user_id = event.user_id
        if user_id not in listed:
            listed.add(user_id)
            prior_signature = batch.prior_signatures[user_id]
            holds = held.get(user_id) == prior_signature
            users.append(
                UserIn(
                    user_id,
                    prior_signature,
                    batch.final_signatures[user_id],
                    batch.stored.get(user_id) or StoredModelState(),
                    None if holds else list(batch.prior_windows.get(user_id, ())),
                )
            )
        window = request.window
        requests.append(
            RequestIn(
                user_id,
                window[-1] if request.appended else WindowEntry.from_event(event),
                len(window),
                None if request.appended else list(window),
            )
        )
    for user in users:
        held[user.user_id] = user.final_signature
        held.move_to_end(user.user_id)
    forget = []
    while len(held) > capacity:
        forget.append(held.popitem(last=False)[0])
    return BatchIn(users, requests, list(batch.popular), batch.k, forget)


class ProcessRecommender:
    """`EncoderRecommender` in a child process (see the module docstring)."""

    source = "encoder"

    def __init__(self, bundle: Path, cache_users: int = 10_000, device: str = "auto") -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a threaded worker
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=serve,
            args=(child_conn, str(bundle), cache_users, device),
            name="interest-inference",
            daemon=True,
        )
        self._process.start()
        child_conn.close()  # the child's end: EOF here once the child is gone
        self._capacity = cache_users
        self._held: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()  # one batch at a time, and close() waits for it
        self._broken = False
        self._encode = msgspec.msgpack.Encoder()
        self._decode_result = msgspec.msgpack.Decoder(ResultOut | Failed)
        try:
            ready = msgspec.msgpack.decode(self._conn.recv_bytes(), type=Ready | Failed)
        except (EOFError, OSError) as exc:
            self.close()
            raise InferenceProcessError(
                f"the inference process exited while loading: {exc!r}"
            ) from exc
        if isinstance(ready, Failed):
            self.close()
            raise InferenceProcessError(ready.error)
        self.ready = ready

    @property
    def model_version(self) -> str:
        return self.ready.model_version

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def recommend(self, batch: Batch) -> Result:
        with self._lock:
            if self._broken:
                raise InferenceProcessError("the inference process failed on an earlier batch")
            # Whatever goes wrong from here on, the child's and our copy of what it holds may
            # differ: no further batch runs on this process.
            self._broken = True
            message = self._encode.encode(slim_batch(batch, self._held, self._capacity))
            try:
                self._conn.send_bytes(message)
                answer = self._decode_result.decode(self._conn.recv_bytes())
            except (EOFError, OSError) as exc:
                raise InferenceProcessError(f"the inference process is gone: {exc!r}") from exc
            if isinstance(answer, Failed):
                raise InferenceProcessError(f"the inference process failed: {answer.error}")
            self._broken = False
            return Result(answer.recommendations, answer.updates)

    def close(self) -> None:
        """Stop the child once the batch it is computing, if any, is done."""
        with self._lock:
            self._broken = True
            self._conn.close()  # the child sees EOF and exits
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


# ---------------------------------------------------------------------------- child side


class ChildState:
    """What the child keeps between batches: the recommender (its state slab) and each held
    user's window and the signature it matches."""

    def __init__(self, recommender: object) -> None:
        self.recommender = recommender
        self.windows: dict[str, tuple[bytes, tuple[WindowEntry, ...]]] = {}

    def batch(self, message: BatchIn) -> Batch:
        """The `Batch` the worker built, from its slim form and the windows held here."""
        prior_windows: dict[str, tuple[WindowEntry, ...]] = {}
        running: dict[str, list[WindowEntry]] = {}
        for user in message.users:
            if user.prior_window is None:
                signature, window = self.windows[user.user_id]
                if signature != user.prior_signature:  # the parent's copy disagrees: a bug
                    raise InferenceProcessError(f"window of {user.user_id!r} is not the one held")
            else:
                window = tuple(user.prior_window)
            prior_windows[user.user_id] = window
            running[user.user_id] = list(window)
        requests = []
        for request in message.requests:
            entry = request.entry
            if request.window is None:
                window = running[request.user_id]
                window.append(entry)
                del window[: len(window) - request.window_length]
            else:
                window = running[request.user_id] = list(request.window)
            event = Event(
                entry.event_id,
                request.user_id,
                entry.item_id,
                entry.event_type,
                entry.timestamp_ms,
                _NO_SOURCE,
            )
            requests.append(Request(event, tuple(window), request.window is None))
        users = message.users
        return Batch(
            requests=requests,
            prior_windows=prior_windows,
            stored={u.user_id: u.stored for u in users},
            prior_signatures={u.user_id: u.prior_signature for u in users},
            final_signatures={u.user_id: u.final_signature for u in users},
            popular=message.popular,
            k=message.k,
        )

    def run(self, message: BatchIn) -> ResultOut:
        batch = self.batch(message)
        result = self.recommender.recommend(batch)  # type: ignore[attr-defined]
        final: dict[str, tuple[WindowEntry, ...]] = dict(batch.prior_windows)
        for request in batch.requests:
            final[request.event.user_id] = request.window
        for user in message.users:
            self.windows[user.user_id] = (user.final_signature, final[user.user_id])
        for user_id in message.forget:
            self.windows.pop(user_id, None)
        return ResultOut(result.recommendations, result.updates)


def serve(conn: Connection, bundle: str, cache_users: int, device: str) -> None:
    """The child: load the bundle, then answer batches until the parent closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the worker, which closes us
    from export.runtime import EncoderRuntime
    from streams.encoder_recommender import EncoderRecommender

    encoder = msgspec.msgpack.Encoder()
    try:
        runtime = EncoderRuntime.load(bundle, device=device)
    except Exception as exc:
        conn.send_bytes(encoder.encode(Failed(f"cannot load {bundle}: {exc}")))
        return
    state = ChildState(EncoderRecommender(runtime, cache_users=cache_users))
    conn.send_bytes(
        encoder.encode(Ready(runtime.version, runtime.provider, runtime.receptive_field))
    )
    decode = msgspec.msgpack.Decoder(BatchIn).decode
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            answer: ResultOut | Failed = state.run(decode(data))
        except Exception:
            answer = Failed(traceback.format_exc(limit=8))
        conn.send_bytes(encoder.encode(answer))
