"""The worker's HTTP port (streams/health.py): metrics, liveness, readiness."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from streams import metrics
from streams.health import Readiness, serve_health
from streams.stack import free_port


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def served() -> tuple[int, Readiness]:
    readiness = Readiness()
    port = free_port()
    server = serve_health(port, readiness, host="127.0.0.1")
    yield port, readiness
    server.shutdown()
    server.server_close()


def test_ready_only_while_the_agent_runs(served: tuple[int, Readiness]) -> None:
    port, readiness = served
    assert get(port, "/healthz") == (200, b"ok")
    status, body = get(port, "/readyz")
    assert status == 503 and json.loads(body)["ready"] is False
    readiness.model_version, readiness.ready = "v1", True
    status, body = get(port, "/readyz")
    assert status == 200 and json.loads(body) == {"ready": True, "model_version": "v1"}


def test_metrics_include_the_model_serving_and_nothing_else_is_served(
    served: tuple[int, Readiness],
) -> None:
    port, _ = served
    metrics.serving("v2")
    status, body = get(port, "/metrics")
    assert status == 200
    assert b'interest_model_info{version="v2"} 1.0' in body
    assert b"interest_model_rollout_failures_total" in body
    assert get(port, "/admin")[0] == 404
