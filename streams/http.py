"""HTTP ingest: `POST /events` puts apps' events on the input topics, `DELETE /users/{user_id}`
asks for a user to be forgotten, `GET /healthz` for probes.

    curl -X POST http://127.0.0.1:8088/events -H 'Content-Type: application/json' \\
         -H "Authorization: Bearer $INTEREST_HTTP_TOKEN" \\
         -d '[{"user_id": "u1", "item_id": "i9", "event_type": "click",
               "timestamp": 1700000000000}]'

The worker validates again and dead-letters what it rejects, but a caller of an HTTP endpoint
cannot read the dead letter topic, so every event is validated here first with the worker's own
`parse_event` and a request is all-or-nothing: one bad event answers 400 naming its index and
nothing is sent. Accepted events are sent with acks=all and the answer (202) waits for the
broker's acknowledgement, so a 202 means the events are durable on the topic.

Event ids: an event without `event_id` gets one derived from its content (a UUIDv5 of its
canonical JSON), not a random one and not the worker's topic/partition/offset id. A client that
retries a request after a timeout or a 503 thus sends the same ids again, and the worker's window
drops an event_id it already holds, so a retry is not applied twice. The price: two events that
are identical in every field (same user, item, type, millisecond and properties) count once;
apps that need both send their own `event_id`.

Forgetting: `DELETE /users/{user_id}` (same token rules) answers 202 {"forget_id": ...} once the
broker acknowledged the request's copy on every input topic (streams/forget.py). Nothing is
looked up, so an unknown user is 202 too. A retry after a timeout or a 503 passes
`?forget_id=<the id>`, so both attempts are one request.

Explanations: `GET /users/{user_id}/explanations[?item=I&k=10&top=3]` (same token rules)
answers streams/explain.py's `explain_user` for the user's state in Redis: the `k` items the
model ranks first now (or just `item`), each with the `top` events of the user's window that
drove it. 404 for an unknown user or item, 503 while no model is configured (INTEREST_MODEL)
or it cannot be loaded. The model is loaded by the first request that needs it, not at
startup, so a server that only takes events needs no model and never imports ONNX Runtime.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote_to_bytes

from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from common.errors import UserError
from streams.client import forget_request, route
from streams.events import Event, InvalidEvent, Source, parse_event
from streams.redis_client import connect
from streams.settings import Settings
from streams.store import StateStore, StoredUser

if TYPE_CHECKING:
    from export.runtime import EncoderRuntime

log = logging.getLogger(__name__)

# Namespace for content-derived event ids (uuid5); fixed forever, or retried ids would change.
EVENT_ID_NAMESPACE = uuid.UUID("6f3c2a1e-9b7d-5e4f-8a2b-1c0d9e8f7a6b")
# Validation only: an HTTP event has no offset yet, and always gets an event_id before this.
HTTP_SOURCE = Source("http", -1, -1)
SEND_TIMEOUT_SECONDS = 30.0
HEALTH_TIMEOUT_SECONDS = 2.0
SHUTDOWN_TIMEOUT_SECONDS = 5.0

# What one explanation request may ask for at most (k items, top events each): it bounds the
# work and the answer a request can cause.
MAX_EXPLAINED = 1000

SETTINGS_KEY = web.AppKey("settings", Settings)
PRODUCER_KEY = web.AppKey("producer", AIOKafkaProducer)
STORE_KEY = web.AppKey("store", StateStore)


class BadEvent(Exception):
    """One event of a request failed validation; `index` is its position in the array."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


def _error(status: int, message: str, **extra: object) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def content_event_id(event: dict[str, Any]) -> str:
    """The id an event without one gets: the same content always gives the same id."""
    canonical = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, canonical))


def prepare_events(payload: object, settings: Settings) -> list[tuple[str, bytes]]:
    """(event_id, message bytes) per event, validated as the worker will; raises BadEvent."""
    events = payload if isinstance(payload, list) else [payload]
    prepared: list[tuple[str, bytes]] = []
    for index, event in enumerate(events):
        if not isinstance(event, dict):
            raise BadEvent(index, "event must be a JSON object")
        if event.get("event_id") is None:
            event = {k: v for k, v in event.items() if k != "event_id"}
            event["event_id"] = content_event_id(event)
        try:
            raw = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadEvent(index, "event contains invalid Unicode (a lone surrogate)") from None
        try:
            parsed = parse_event(
                raw,
                HTTP_SOURCE,
                max_id_length=settings.max_id_length,
                max_event_bytes=settings.max_event_bytes,
            )
        except InvalidEvent as exc:
            raise BadEvent(index, str(exc)) from None
        if not isinstance(parsed, Event):
            # One copy on one topic would not be a forget request: DELETE sends one per topic.
            raise BadEvent(index, "control records are not events; use DELETE /users/{user_id}")
        prepared.append((parsed.event_id, raw))
    return prepared


def _authorized(request: web.Request, settings: Settings) -> bool:
    if settings.http_token is None:
        return True
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    expected = settings.http_token.get_secret_value().encode()
    # compare_digest runs in time independent of where the strings differ.
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), expected)


def _unauthorized() -> web.Response:
    response = _error(401, "missing or wrong bearer token")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def post_events(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    if not _authorized(request, settings):
        return _unauthorized()
    if request.content_type != "application/json":
        return _error(415, "Content-Type must be application/json")
    limit = settings.http_max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return _error(413, f"body is {request.content_length} bytes, more than {limit}")
    body = await request.read()  # raises 413 past client_max_size (chunked bodies too)
    try:
        payload = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        return _error(400, "body is not valid UTF-8")
    except ValueError as exc:
        return _error(400, f"body is not JSON: {exc}")
    count = len(payload) if isinstance(payload, list) else 1
    if count == 0:
        return _error(400, "empty array: no events to accept")
    if count > settings.http_max_events_per_request:
        return _error(
            413, f"{count} events, more than {settings.http_max_events_per_request} per request"
        )
    try:
        prepared = prepare_events(payload, settings)
    except BadEvent as exc:
        return _error(400, exc.reason, index=exc.index)

    producer = request.app[PRODUCER_KEY]
    try:
        futures = []
        for _, raw in prepared:
            topic, key = route(settings, raw)
            futures.append(await producer.send(topic, value=raw, key=key))
        await asyncio.wait_for(asyncio.gather(*futures), SEND_TIMEOUT_SECONDS)
    except (KafkaError, TimeoutError) as exc:
        log.warning("sending %d events failed: %r", len(prepared), exc)
        # Some may be on the topic already; ids are deterministic, so a retry is deduplicated.
        return _error(503, f"broker did not acknowledge the events ({exc!r}); retry the request")
    return web.json_response(
        {"accepted": len(prepared), "event_ids": [event_id for event_id, _ in prepared]},
        status=202,
    )


def user_target(request: web.Request, from_end: int = 1) -> tuple[str, dict[str, str]]:
    """(user_id, query parameters) of a /users/... request, percent-decoded strictly; the user
    id is the path's segment ``from_end`` from the end. ValueError if not UTF-8.

    Read from the raw URL because aiohttp keeps an undecodable escape such as %FF as literal
    text, and forgetting the user "%FF" instead of refusing would forget someone else.
    """
    path, _, query = request.raw_path.partition("?")
    try:
        user_id = unquote_to_bytes(path.rsplit("/", from_end)[1]).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("user_id is not valid Unicode (UTF-8)") from None
    try:
        params = dict(parse_qsl(query, keep_blank_values=True, errors="strict"))
    except UnicodeDecodeError:
        raise ValueError("query is not valid Unicode (UTF-8)") from None
    return user_id, params


def forget_target(request: web.Request) -> tuple[str, str | None]:
    """(user_id, forget_id or None) of a DELETE; ValueError if not UTF-8 (`user_target`)."""
    user_id, params = user_target(request)
    return user_id, params.get("forget_id")


async def delete_user(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    if not _authorized(request, settings):
        return _unauthorized()
    try:
        key, value, forget_id = forget_request(settings, *forget_target(request))
    except ValueError as exc:
        return _error(400, str(exc))

    producer = request.app[PRODUCER_KEY]
    try:
        futures = [
            await producer.send(topic, value=value, key=key) for topic in settings.input_topics
        ]
        await asyncio.wait_for(asyncio.gather(*futures), SEND_TIMEOUT_SECONDS)
    except (KafkaError, TimeoutError) as exc:
        # The user id stays out of the log: it is what the caller asked to have erased.
        log.warning("sending forget request %s failed: %r", forget_id, exc)
        return _error(
            503,
            f"broker did not acknowledge the forget request ({exc!r}); "
            f"retry with ?forget_id={forget_id}",
            forget_id=forget_id,
        )
    return web.json_response({"forget_id": forget_id}, status=202)


class ModelUnavailable(Exception):
    """The configured bundle cannot be loaded (a 503: it may be fixed or copied in)."""


class ExplainModel:
    """The bundle explanations run on, loaded by the first request that needs it.

    One thread of its own both loads the bundle (seconds of CPU) and runs every explanation,
    so neither holds the event loop, a second request that arrives during the load waits for
    that load instead of starting another, and the ONNX sessions are used by one thread.
    A bundle that failed to load is tried again by the next request.
    """

    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle
        self._runtime: EncoderRuntime | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="explain")

    async def explain(
        self, user_id: str, user: StoredUser | None, item_id: str | None, k: int, top: int
    ) -> dict[str, Any]:
        """`explain_user`'s answer; UserError for an unknown user or item, ModelUnavailable
        if the bundle does not load."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._thread, self._explain, user_id, user, item_id, k, top
        )

    def _explain(
        self, user_id: str, user: StoredUser | None, item_id: str | None, k: int, top: int
    ) -> dict[str, Any]:
        from streams.explain import explain_user

        return explain_user(self._loaded(), user_id, user, item_id, k, top)

    def _loaded(self) -> EncoderRuntime:
        if self._runtime is None:
            from export.runtime import BundleError, EncoderRuntime

            try:
                self._runtime = EncoderRuntime.load(self.bundle)
            except (BundleError, OSError) as exc:
                raise ModelUnavailable(f"cannot load INTEREST_MODEL={self.bundle}: {exc}") from None
            log.info("explaining with model %s", self._runtime.version)
        return self._runtime

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


EXPLAIN_MODEL_KEY = web.AppKey("explain_model", ExplainModel)


def explain_query(params: dict[str, str]) -> tuple[str | None, int, int]:
    """(item or None, k, top) of an explanations request; ValueError naming a bad value."""
    unknown = sorted(set(params) - {"item", "k", "top"})
    if unknown:
        raise ValueError(f"unknown query parameter {unknown[0]!r} (known: item, k, top)")
    item = params.get("item")
    if item is not None and not item.strip():
        raise ValueError("item must not be empty")
    return item, _count(params, "k", 10), _count(params, "top", 3)


def _count(params: dict[str, str], name: str, default: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    # isascii: str.isdigit also accepts digits int() would read from other scripts ("٣").
    value = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 6 else 0
    if not 1 <= value <= MAX_EXPLAINED:
        shown = raw if len(raw) <= 20 else raw[:20] + "..."
        raise ValueError(f"{name} must be a whole number from 1 to {MAX_EXPLAINED}, not {shown!r}")
    return value


async def get_explanations(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    if not _authorized(request, settings):
        return _unauthorized()
    try:
        user_id, params = user_target(request, from_end=2)
        item_id, k, top = explain_query(params)
    except ValueError as exc:
        return _error(400, str(exc))
    model = request.app.get(EXPLAIN_MODEL_KEY)
    if model is None:
        return _error(503, "no model configured: explanations need INTEREST_MODEL")
    try:
        user = await request.app[STORE_KEY].read_user(user_id)
    except RedisError as exc:
        log.warning("reading a user's state for an explanation failed: %r", exc)
        return _error(503, f"state store unreachable ({exc!r}); retry the request")
    try:
        explained = await model.explain(user_id, user, item_id, k, top)
    except UserError as exc:
        return _error(404, str(exc))
    except ModelUnavailable as exc:
        log.warning("%s", exc)
        return _error(503, str(exc))
    return web.json_response(explained)


async def healthz(request: web.Request) -> web.Response:
    """200 only while the broker answers a metadata request: a live process is not enough."""
    producer = request.app[PRODUCER_KEY]
    try:
        await asyncio.wait_for(producer.client.fetch_all_metadata(), HEALTH_TIMEOUT_SECONDS)
    except (KafkaError, TimeoutError) as exc:
        return _error(503, f"broker unreachable: {exc!r}")
    return web.json_response({"status": "ok"})


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own 404/405/413 become JSON like ours, so clients parse one error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow",)}
        return web.json_response(
            {"error": exc.text or exc.reason}, status=exc.status, headers=headers
        )


def create_http_app(settings: Settings) -> web.Application:
    """The ingest application; its producer starts with the app and is flushed on cleanup."""
    app = web.Application(client_max_size=settings.http_max_body_bytes, middlewares=[json_errors])
    app[SETTINGS_KEY] = settings

    async def start_producer(app: web.Application) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=f"{settings.group_id}-http",
            acks="all",
            linger_ms=5,
            **settings.kafka_client_options(),  # type: ignore[arg-type]
        )
        await producer.start()
        app[PRODUCER_KEY] = producer

    async def stop_producer(app: web.Application) -> None:
        producer = app.get(PRODUCER_KEY)
        if producer is None:
            return
        try:
            # Bounded: with the broker gone, stop() would wait out every pending batch, yet
            # those requests were already answered 503, so nothing acknowledged is dropped.
            await asyncio.wait_for(producer.stop(), SHUTDOWN_TIMEOUT_SECONDS)
        except TimeoutError:
            log.warning(
                "producer did not flush within %ss; unsent batches dropped",
                SHUTDOWN_TIMEOUT_SECONDS,
            )

    async def open_store(app: web.Application) -> None:
        # No connection is made until the first explanation reads a user.
        app[STORE_KEY] = StateStore(connect(settings), settings)

    async def close_explaining(app: web.Application) -> None:
        model = app.get(EXPLAIN_MODEL_KEY)
        if model is not None:
            model.close()
        store = app.get(STORE_KEY)
        if store is not None:
            await store.client.aclose()

    if settings.model is not None:
        app[EXPLAIN_MODEL_KEY] = ExplainModel(settings.model)
    app.on_startup.extend([start_producer, open_store])
    app.on_cleanup.extend([stop_producer, close_explaining])
    app.router.add_post("/events", post_events)
    app.router.add_delete("/users/{user_id}", delete_user)
    app.router.add_delete("/users/", delete_user)  # an empty id: 400 saying so, not 404
    app.router.add_get("/users/{user_id}/explanations", get_explanations)
    app.router.add_get("/healthz", healthz)
    return app


def run_http(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; topics are created first so serving before the worker works."""
    from streams.logs import configure_logging
    from streams.topics import ensure_topics

    configure_logging(settings)
    ensure_topics(settings)
    web.run_app(
        create_http_app(settings),
        host=settings.http_host,
        port=settings.http_port,
    )
