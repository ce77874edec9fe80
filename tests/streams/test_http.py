"""HTTP ingest against the real embedded broker: what is accepted lands keyed by user on the
right topic, and what is refused (bad event, too big, no token, not JSON) sends nothing.
DELETE /users/{id} puts one forget request per input topic on the user's partition.
GET /users/{id}/explanations answers what `explain_user` makes of the user's state in Redis."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr
from yarl import URL

from common.errors import UserError
from streams.client import InterestClient
from streams.http import PRODUCER_KEY, content_event_id, create_http_app
from streams.redis_client import connect
from streams.settings import Settings
from streams.store import StateStore, UserWrite
from streams.window import UserState, WindowEntry
from tests.conftest import read_records

Scenario = Callable[[TestClient], Awaitable[None]]


def event(user: str = "u1", item: str = "i1", kind: str = "click", **extra: Any) -> dict:
    return {
        "user_id": user,
        "item_id": item,
        "event_type": kind,
        "timestamp": 1_700_000_000_000,
        **extra,
    }


def serve(settings: Settings, scenario: Scenario) -> None:
    """Run `scenario` against the app on a real socket, its producer connected to the broker."""

    async def main() -> None:
        async with TestClient(TestServer(create_http_app(settings))) as client:
            await scenario(client)

    asyncio.run(main())


async def post(client: TestClient, body: object, **headers: str) -> ClientResponse:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post(
        "/events", data=data, headers={"Content-Type": "application/json", **headers}
    )


def test_single_event_and_array_land_on_their_topics_keyed_by_user(settings: Settings) -> None:
    answers: list[dict[str, Any]] = []

    async def scenario(client: TestClient) -> None:
        response = await post(client, event("u1", "i1", event_id="mine-1"))
        assert response.status == 202, await response.text()
        answers.append(await response.json())
        batch = [event("u2", "i2"), event("u3", "i3", "purchase"), event("u2", "i4", "view")]
        response = await post(client, batch)
        assert response.status == 202, await response.text()
        answers.append(await response.json())
        health = await client.get("/healthz")
        assert health.status == 200

    serve(settings, scenario)

    assert answers[0] == {"accepted": 1, "event_ids": ["mine-1"]}
    assert answers[1]["accepted"] == 3
    generated = answers[1]["event_ids"]
    assert generated[0] == content_event_id(event("u2", "i2"))  # same content, same id
    assert len(set(generated)) == 3

    clicks = read_records(settings, settings.topic_clicks, 3)
    purchases = read_records(settings, settings.topic_purchases, 1)
    by_id = {json.loads(r.value)["event_id"]: r for r in clicks + purchases}
    assert sorted(by_id) == sorted(["mine-1", *generated])
    for record in clicks + purchases:
        assert record.key == json.loads(record.value)["user_id"].encode()
    assert [json.loads(r.value)["user_id"] for r in purchases] == ["u3"]
    assert json.loads(by_id[generated[1]].value)["event_type"] == "purchase"


def test_one_bad_event_refuses_the_whole_request(settings: Settings) -> None:
    async def scenario(client: TestClient) -> None:
        batch = [event("u1", "i1"), event("u1", "i2", kind="hover"), event("u1", "i3")]
        response = await post(client, batch)
        assert response.status == 400
        body = await response.json()
        assert body["index"] == 1
        assert "event_type" in body["error"]

        response = await post(client, [event("u1", "i1"), "not an object"])
        assert (response.status, (await response.json())["index"]) == (400, 1)
        response = await post(client, event(user=""))
        assert (response.status, (await response.json())["index"]) == (400, 0)
        response = await post(client, [])
        assert response.status == 400
        control = {"control": "forget", "user_id": "u1", "forget_id": "f1"}
        response = await post(client, [event("u1", "i1"), control])
        assert (response.status, (await response.json())["index"]) == (400, 1)
        assert "DELETE /users/" in (await response.json())["error"]
        # A marker after the refusals: once it is on the topic, anything refused would be too.
        response = await post(client, event("marker", "i9"))
        assert response.status == 202

    serve(settings, scenario)
    records = read_records(settings, settings.topic_clicks, 1)
    assert [json.loads(r.value)["user_id"] for r in records] == ["marker"]


def test_oversize_body_and_too_many_events_are_413(settings: Settings) -> None:
    small = settings.model_copy(
        update={"http_max_body_bytes": 2048, "http_max_events_per_request": 3}
    )

    async def scenario(client: TestClient) -> None:
        big = [event("u1", f"item-{n:04d}") for n in range(40)]
        response = await post(client, big)
        assert response.status == 413
        assert "2048" in (await response.json())["error"]

        async def chunks() -> Any:  # no Content-Length: the limit must hold while reading
            for _ in range(10):
                yield b" " * 1024
            yield b"[]"

        response = await client.post(
            "/events", data=chunks(), headers={"Content-Type": "application/json"}
        )
        assert response.status == 413

        response = await post(client, [event("u1", f"i{n}") for n in range(4)])
        assert response.status == 413
        assert "more than 3" in (await response.json())["error"]
        assert (await post(client, event("marker"))).status == 202

    serve(small, scenario)
    records = read_records(small, small.topic_clicks, 1)
    assert [json.loads(r.value)["user_id"] for r in records] == ["marker"]


def test_bearer_token_is_required_when_configured(settings: Settings) -> None:
    guarded = settings.model_copy(update={"http_token": SecretStr("s3cret")})

    async def scenario(client: TestClient) -> None:
        response = await post(client, event())
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        response = await post(client, event(), Authorization="Bearer wrong")
        assert response.status == 401
        response = await post(client, event(), Authorization="Basic s3cret")
        assert response.status == 401
        response = await post(client, event(item="ok"), Authorization="Bearer s3cret")
        assert response.status == 202

    serve(guarded, scenario)
    records = read_records(guarded, guarded.topic_clicks, 1)
    assert [json.loads(r.value)["item_id"] for r in records] == ["ok"]


def test_malformed_requests_get_a_reason(settings: Settings) -> None:
    async def scenario(client: TestClient) -> None:
        response = await post(client, b"{not json")
        assert response.status == 400
        assert "not JSON" in (await response.json())["error"]
        response = await post(client, b'{"user_id": NaN}')
        assert response.status == 400
        response = await post(client, b"\xff\xfe")
        assert response.status == 400
        assert "UTF-8" in (await response.json())["error"]
        response = await client.post(
            "/events", data=json.dumps(event()), headers={"Content-Type": "text/plain"}
        )
        assert response.status == 415
        response = await client.get("/events")
        assert response.status == 405
        assert "error" in await response.json()
        assert (await post(client, event("marker"))).status == 202

    serve(settings, scenario)
    records = read_records(settings, settings.topic_clicks, 1)
    assert [json.loads(r.value)["user_id"] for r in records] == ["marker"]


async def delete(client: TestClient, path: str, **headers: str) -> ClientResponse:
    """DELETE `path` as written: percent escapes reach the server as they are."""
    return await client.delete(URL(path, encoded=True), headers=headers)


def forget_copies(settings: Settings, per_topic: int) -> list[tuple[str, Any]]:
    """(topic, record) of every forget request on the input topics, each of which holds at least
    `per_topic` records (events included) once all that was sent has landed."""
    found = []
    for topic in settings.input_topics:
        for record in read_records(settings, topic, per_topic):
            if json.loads(record.value).get("control") == "forget":
                found.append((topic, record))
    return found


def test_delete_user_sends_a_forget_per_input_topic_on_the_users_partition(
    settings: Settings,
) -> None:
    users = ["ana", "bo", "cy", "dee", "é/ü"]  # the last one percent-encoded in the path
    paths = ["/users/ana", "/users/bo", "/users/cy", "/users/dee", "/users/%C3%A9%2F%C3%BC"]
    with InterestClient(settings) as pusher:
        pusher.push([event(u, "i1", kind) for u in users for kind in ("click", "purchase")])
    since_ms = int(time.time() * 1000)
    answers: list[str] = []

    async def scenario(client: TestClient) -> None:
        for path in paths:
            response = await delete(client, path)
            assert response.status == 202, await response.text()
            answers.append((await response.json())["forget_id"])
        response = await delete(client, f"/users/ana?forget_id={answers[0]}")  # a retry
        assert (response.status, await response.json()) == (202, {"forget_id": answers[0]})

    serve(settings, scenario)

    assert len(set(answers)) == len(users) and all(len(f) == 32 for f in answers)
    # One copy per input topic per request; the retry is one more copy of ana's request.
    requests = [*zip(users, answers, strict=True), ("ana", answers[0])]
    expected = sorted((topic, u, f) for topic in settings.input_topics for u, f in requests)
    pushed_to = {
        (topic, json.loads(r.value)["user_id"]): r.partition
        for topic in settings.input_topics
        for r in read_records(settings, topic, len(users))
        if "control" not in json.loads(r.value)
    }
    assert len(set(pushed_to.values())) > 1  # users spread, so a fixed partition would show
    copies = forget_copies(settings, len(users) + len(requests))
    seen = []
    for topic, record in copies:
        value = json.loads(record.value)
        user = value["user_id"]
        assert record.key == user.encode()
        assert record.partition == pushed_to[(topic, user)], (topic, user)
        assert value["control"] == "forget" and set(value) == {
            "control",
            "user_id",
            "forget_id",
            "requested_at",
        }
        assert since_ms <= value["requested_at"] <= int(time.time() * 1000)
        seen.append((topic, user, value["forget_id"]))
    assert sorted(seen) == expected


def test_delete_user_refuses_bad_ids_and_sends_nothing(settings: Settings) -> None:
    short = settings.model_copy(update={"max_id_length": 8})

    async def scenario(client: TestClient) -> None:
        refused = {
            "/users/": "user_id must not be empty",
            "/users/%20%20": "user_id must not be empty",
            "/users/xxxxxxxxx": "user_id is longer than 8 characters",
            "/users/%FF": "user_id is not valid Unicode (UTF-8)",
            "/users/%ED%A0%80": "user_id is not valid Unicode (UTF-8)",  # a lone surrogate
            "/users/ana?forget_id=": "forget_id must not be empty",
            "/users/ana?forget_id=+": "forget_id must not be empty",
            "/users/ana?forget_id=fffffffff": "forget_id is longer than 8 characters",
            "/users/ana?forget_id=%FF": "query is not valid Unicode (UTF-8)",
        }
        for path, reason in refused.items():
            response = await delete(client, path)
            assert (response.status, await response.json()) == (400, {"error": reason}), path
        # A marker after the refusals: once it is on the topics, anything refused would be too.
        assert (await delete(client, "/users/marker")).status == 202

    serve(short, scenario)
    copies = forget_copies(short, 1)
    assert sorted((topic, r.key) for topic, r in copies) == [
        (topic, b"marker") for topic in sorted(short.input_topics)
    ]


def test_delete_user_requires_the_bearer_token_when_configured(settings: Settings) -> None:
    guarded = settings.model_copy(update={"http_token": SecretStr("s3cret")})

    async def scenario(client: TestClient) -> None:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = await delete(client, "/users/ana", **headers)
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
        # The token is checked first: a bad id without it is 401 too, revealing nothing.
        assert (await delete(client, "/users/%20")).status == 401
        response = await delete(client, "/users/bo", Authorization="Bearer s3cret")
        assert response.status == 202

    serve(guarded, scenario)
    copies = forget_copies(guarded, 1)
    assert sorted((topic, r.key) for topic, r in copies) == [
        (topic, b"bo") for topic in sorted(guarded.input_topics)
    ]


def test_delete_user_is_503_with_the_forget_id_when_the_broker_does_not_acknowledge(
    settings: Settings,
) -> None:
    async def scenario(client: TestClient) -> None:
        await client.app[PRODUCER_KEY].stop()  # nothing can reach the broker any more
        response = await delete(client, "/users/ana?forget_id=retry-me")
        assert response.status == 503
        body = await response.json()
        assert body["forget_id"] == "retry-me"
        assert "forget_id=retry-me" in body["error"]

    serve(settings, scenario)
    assert forget_copies(settings, 0) == []


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny exported model over item-0 .. item-29 (tests/streams/test_encoder_stream.py)."""
    pytest.importorskip("torch", reason="needs the training extra (pip install -e .[train])")
    from tests.streams.test_encoder_stream import make_bundle

    return make_bundle(tmp_path_factory.mktemp("explain"), seed=3)[1]


def store_user(
    settings: Settings,
    user_id: str,
    window: Sequence[WindowEntry],
    memory: bytes | None = None,
    model_version: str | None = None,
) -> None:
    """Write a user's state as the worker would (one write_batch), without running one."""

    async def write() -> None:
        client = connect(settings)
        try:
            state = UserState(window=list(window), offsets={"clicks/0": len(window)})
            write = UserWrite(
                state, new_entries=state.window, memory=memory, model_version=model_version
            )
            await StateStore(client, settings).write_batch({user_id: write}, [], None)
        finally:
            await client.aclose()

    asyncio.run(write())


def explained_here(
    settings: Settings, bundle: Path, user_id: str, item_id: str | None, k: int, top: int
) -> dict[str, Any]:
    """What streams/explain.py answers in this process for the state Redis holds now."""
    from export.runtime import EncoderRuntime
    from streams.explain import explain_user

    async def read() -> Any:
        client = connect(settings)
        try:
            return await StateStore(client, settings).read_user(user_id)
        finally:
            await client.aclose()

    user = asyncio.run(read())
    return explain_user(EncoderRuntime.load(bundle), user_id, user, item_id, k, top)


def history(n: int) -> list[WindowEntry]:
    kinds = ("click", "view", "purchase")
    return [
        WindowEntry(f"e{i}", f"item-{(7 * i) % 30}", kinds[i % 3], 1_767_225_600_000 + i * 60_000)
        for i in range(n)
    ]


def test_explanations_answer_what_explain_user_makes_of_the_stored_state(
    settings: Settings, bundle: Path
) -> None:
    guarded = settings.model_copy(update={"http_token": SecretStr("s3cret"), "model": bundle})
    version = json.loads((bundle / "manifest.json").read_text())["version"]
    memory = np.random.default_rng(0).normal(size=16).astype(np.float32).tobytes()
    window = [*history(8), WindowEntry("x1", "not-in-the-model", "click", 1_767_300_000_000)]
    store_user(guarded, "ana", window, memory, version)
    store_user(guarded, "é/ü", history(3))
    queries = {
        "": ("ana", None, 10, 3),
        "?item=item-3&top=2": ("ana", "item-3", 10, 2),
        "?k=4&top=1": ("ana", None, 4, 1),
    }
    expected = {q: explained_here(guarded, bundle, *args) for q, args in queries.items()}
    other = explained_here(guarded, bundle, "é/ü", None, 10, 3)
    answers: dict[str, Any] = {}
    token = {"Authorization": "Bearer s3cret"}

    async def scenario(client: TestClient) -> None:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = await client.get("/users/ana/explanations", headers=headers)
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
        for query in queries:
            response = await client.get(f"/users/ana/explanations{query}", headers=token)
            assert response.status == 200, await response.text()
            answers[query] = await response.json()
        path = URL("/users/%C3%A9%2F%C3%BC/explanations", encoded=True)
        response = await client.get(path, headers=token)
        assert response.status == 200, await response.text()
        answers["other"] = await response.json()

    serve(guarded, scenario)
    assert answers == {**expected, "other": other}
    top = answers[""]
    assert (top["user_id"], top["model_version"], len(top["items"])) == ("ana", version, 10)
    seen = {entry.item_id for entry in window}
    for item in top["items"]:
        assert item["item_id"] not in seen
        assert len(item["because"]) == 3
        assert {r["event_id"] for r in item["because"]} <= {e.event_id for e in window}
    assert [i["item_id"] for i in answers["?item=item-3&top=2"]["items"]] == ["item-3"]
    assert [len(i["because"]) for i in answers["?k=4&top=1"]["items"]] == [1] * 4


def test_explanations_refuse_unknown_users_and_items_and_bad_queries(
    settings: Settings, bundle: Path
) -> None:
    served = settings.model_copy(update={"model": bundle})
    store_user(served, "ana", history(5))
    with pytest.raises(UserError) as unknown_user:
        explained_here(served, bundle, "nobody", None, 10, 3)

    async def scenario(client: TestClient) -> None:
        response = await client.get("/users/nobody/explanations")
        assert (response.status, await response.json()) == (
            404,
            {"error": str(unknown_user.value)},
        )
        response = await client.get("/users/ana/explanations?item=no-such-item")
        assert response.status == 404
        assert "unknown item 'no-such-item'" in (await response.json())["error"]
        refused = {
            "?k=0": "k must be a whole number from 1 to 1000, not '0'",
            "?k=-1": "k must be a whole number from 1 to 1000, not '-1'",
            "?k=abc": "k must be a whole number from 1 to 1000, not 'abc'",
            "?k=1.5": "k must be a whole number from 1 to 1000, not '1.5'",
            "?k=": "k must be a whole number from 1 to 1000, not ''",
            "?k=1001": "k must be a whole number from 1 to 1000, not '1001'",
            "?k=%D9%A3": "k must be a whole number from 1 to 1000, not '\u0663'",
            "?top=0": "top must be a whole number from 1 to 1000, not '0'",
            "?top=" + "9" * 5000: f"top must be a whole number from 1 to 1000, not '{'9' * 20}...'",
            "?item=": "item must not be empty",
            "?items=item-3": "unknown query parameter 'items' (known: item, k, top)",
            "?item=%FF": "query is not valid Unicode (UTF-8)",
        }
        for query, reason in refused.items():
            response = await client.get(URL(f"/users/ana/explanations{query}", encoded=True))
            assert (response.status, await response.json()) == (400, {"error": reason}), query
        response = await client.get(URL("/users/%FF/explanations", encoded=True))
        assert (response.status, await response.json()) == (
            400,
            {"error": "user_id is not valid Unicode (UTF-8)"},
        )
        response = await client.post("/users/ana/explanations")
        assert response.status == 405
        # After all that, the same server still explains.
        assert (await client.get("/users/ana/explanations?k=2")).status == 200

    serve(served, scenario)


def test_explanations_are_503_without_a_usable_model_and_events_need_none(
    settings: Settings, tmp_path: Path
) -> None:
    missing = settings.model_copy(update={"model": tmp_path / "no-bundle-here"})
    no_redis = missing.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})

    async def without_model(client: TestClient) -> None:
        response = await client.get("/users/ana/explanations")
        assert (response.status, await response.json()) == (
            503,
            {"error": "no model configured: explanations need INTEREST_MODEL"},
        )
        assert (await post(client, event("u1", "i1"))).status == 202

    async def unloadable(client: TestClient) -> None:
        # The server started and takes events although the bundle is not there: it is loaded
        # by the first explanation, and tried again by the next.
        assert (await post(client, event("u2", "i2"))).status == 202
        for _ in range(2):
            response = await client.get("/users/ana/explanations")
            assert response.status == 503
            error = (await response.json())["error"]
            assert error.startswith(f"cannot load INTEREST_MODEL={tmp_path / 'no-bundle-here'}")

    async def store_down(client: TestClient) -> None:
        response = await client.get("/users/ana/explanations")
        assert response.status == 503
        assert "state store unreachable" in (await response.json())["error"]

    serve(settings, without_model)
    serve(missing, unloadable)
    serve(no_redis, store_down)
    records = read_records(settings, settings.topic_clicks, 2)
    assert sorted(json.loads(r.value)["user_id"] for r in records) == ["u1", "u2"]
