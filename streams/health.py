"""The worker's HTTP port: Prometheus metrics, liveness and readiness, in a thread of its own.

Why a thread: the worker's event loop is busy with batches; a scrape or a probe must be
answered even while it is (and tells the truth about a worker stuck in a batch only by its
metrics, not by timing out). The server is the stdlib's, as prometheus_client's own is.

    /metrics   the process's Prometheus registry
    /healthz   200 while the process serves at all (a liveness probe)
    /readyz    200 once the agent runs: Redis client and producer started, model loaded;
               503 before and while shutting down (a readiness probe). JSON either way.
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import make_wsgi_app

StartResponse = Callable[..., Any]


@dataclass
class Readiness:
    """What the worker tells its probes; set from the event loop, read by the server thread."""

    ready: bool = False
    model_version: str | None = None

    def as_json(self) -> bytes:
        return orjson.dumps({"ready": self.ready, "model_version": self.model_version})


def health_app(readiness: Readiness) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    """The WSGI app behind the port."""
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return _reply(start_response, "200 OK", b"ok", "text/plain")
        if path == "/readyz":
            status = "200 OK" if readiness.ready else "503 Service Unavailable"
            return _reply(start_response, status, readiness.as_json(), "application/json")
        if path in ("/metrics", "/"):
            return metrics(environ, start_response)
        return _reply(start_response, "404 Not Found", b"not found", "text/plain")

    return app


def _reply(start_response: StartResponse, status: str, body: bytes, kind: str) -> list[bytes]:
    start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
    return [body]


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # stdlib's name
        """Probes every few seconds are not worth a log line each."""


def serve_health(port: int, readiness: Readiness, host: str = "0.0.0.0") -> WSGIServer:
    """Start serving on ``port`` in a daemon thread; returns the server (``shutdown()``)."""
    server = make_server(
        host, port, health_app(readiness), _ThreadingServer, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server
