"""`interest monitor`: the operations page, its JSON and Prometheus's /metrics, on one port.

    GET /                the page (static/index.html; its script polls /api/status)
    GET /static/<name>   the page's files, shipped in the package (nothing from the internet)
    GET /api/status      the latest snapshot (streams/monitor/collector.py)
    GET /metrics         the snapshot as Prometheus metrics (streams/monitor/exposition.py)
    GET /healthz         "ok"

Anything else is 404, and another method on these paths 405. One collection runs at a time,
in a thread, every interval; every request answers from the latest snapshot, so a slow or
unreachable cluster never holds a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streams.monitor.collector import Collector
from streams.monitor.exposition import monitor_registry
from streams.settings import Settings

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
# Only plain file names below STATIC: no paths, no dot files.
STATIC_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
CONTENT_TYPES |= {".png": "image/png", ".svg": "image/svg+xml"}


def create_monitor_app(
    settings: Settings, groups: Sequence[str], interval_seconds: float, window: int = 10
) -> web.Application:
    """The monitor's aiohttp application; collecting starts with it and stops with it."""
    app = web.Application()
    state: dict[str, Any] = {"snapshot": None}
    registry, errors = monitor_registry(lambda: state["snapshot"])

    async def collecting(app: web.Application) -> AsyncIterator[None]:
        collector = Collector(settings, groups, interval_seconds, window)
        task = asyncio.create_task(_collect_forever(collector, state, errors, interval_seconds))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.to_thread(collector.close)

    async def status(request: web.Request) -> web.Response:
        snapshot = state["snapshot"]
        if snapshot is None:
            return web.json_response({"error": "the first snapshot is being taken"}, status=503)
        return web.json_response(snapshot, headers={"Cache-Control": "no-store"})

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.cleanup_ctx.append(collecting)
    app.router.add_get("/", _index)
    app.router.add_get("/static/{name}", _static)
    app.router.add_get("/api/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", _healthz)
    return app


async def _collect_forever(
    collector: Collector, state: dict[str, Any], errors: Any, interval_seconds: float
) -> None:
    """Take a snapshot every interval (at most one at a time), in a thread."""
    loop = asyncio.get_running_loop()
    last_error = None
    while True:
        started = loop.time()
        try:
            snapshot = await asyncio.to_thread(collector.collect)
        except Exception:  # a bug in one collection must not end the monitor
            log.exception("collecting a snapshot failed; trying again")
            errors.inc()
        else:
            if snapshot["error"]:
                errors.inc()
            if snapshot["error"] != last_error:  # logged when it changes, not every interval
                log.warning("%s", snapshot["error"] or "collecting again without errors")
                last_error = snapshot["error"]
            state["snapshot"] = snapshot
        await asyncio.sleep(max(0.0, interval_seconds - (loop.time() - started)))


async def _index(request: web.Request) -> web.FileResponse:
    return _file(STATIC / "index.html")


async def _static(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    path = STATIC / name
    if not STATIC_NAME.match(name) or not path.is_file():
        raise web.HTTPNotFound(text="not found")
    return _file(path)


def _file(path: Path) -> web.FileResponse:
    content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
    return web.FileResponse(path, headers={"Content-Type": content_type})


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def run_monitor(
    settings: Settings, groups: Sequence[str], host: str, port: int, interval_seconds: float
) -> None:
    """Serve until SIGINT/SIGTERM."""
    from streams.logs import configure_logging

    configure_logging(settings)
    # kafka-python logs every failed connection attempt; the snapshot's error says it once.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    log.warning("monitor on http://%s:%d/ (groups: %s)", host, port, ", ".join(groups))
    web.run_app(
        create_monitor_app(settings, groups, interval_seconds),
        host=host,
        port=port,
        print=None,
    )
