"""The monitor's collector and server on the real embedded stack with a real worker: the
numbers operators read (lag, lag in time, statuses, rates, latency, models, dead letters), the
same in `interest lag`, and clear messages for bad input."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from streams.client import InterestClient
from streams.monitor.collector import Collector
from streams.monitor.server import create_monitor_app
from streams.sample import sample_events
from streams.settings import Settings
from tests.conftest import WorkerProcess, interest, read_json, wait_for


def partitions(snapshot: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    (group,) = snapshot["groups"]
    return {(p["topic"], p["partition"]): p for p in group["partitions"]}


def table_rows(text: str) -> list[list[str]]:
    """The cells of each row of a table `interest lag` printed."""
    return [
        [cell.strip() for cell in line.strip("│").split("│")]
        for line in text.splitlines()
        if line.startswith("│")
    ]


def collect_until(
    collector: Collector, done: Callable[[dict[str, Any]], bool], seconds: float, what: str
) -> dict[str, Any]:
    """Snapshots every 0.3 s until ``done`` holds for one (then it is returned)."""
    deadline = time.monotonic() + seconds
    while True:
        snapshot = collector.collect()
        if done(snapshot):
            return snapshot
        assert time.monotonic() < deadline, f"{what}: last snapshot {json.dumps(snapshot)[:2000]}"
        time.sleep(0.3)


def test_lag_rates_latency_and_a_stopped_worker(
    settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    events = list(sample_events(users=6, events_per_user=5, items=40))
    collector = Collector(settings, [settings.group_id], interval_seconds=0.3, window=5)
    try:
        collector.collect()  # the tail starts at the topics' ends from here
        worker = start_worker()
        with InterestClient(settings) as client:
            client.push(events)
            client.push([b"not json"])
        read_json(settings, settings.topic_recommendations, len(events), timeout=60)

        def caught_up(snapshot: dict[str, Any]) -> bool:
            rows = partitions(snapshot).values()
            return sum(p["end"] for p in rows) == len(events) + 1 and all(
                p["lag"] == 0 for p in rows
            )

        snapshot = collect_until(collector, caught_up, 60, "the worker to commit everything")
        assert snapshot["error"] is None
        assert all(
            p["status"] == "OK" and p["lag_seconds"] == 0 for p in partitions(snapshot).values()
        )
        assert snapshot["latency"]["samples"] == len(events)
        assert 0 < snapshot["latency"]["p50_ms"] <= snapshot["latency"]["p99_ms"] < 60_000
        assert snapshot["rates"]["dead_letters_per_s"] == {"not_json": round(1 / 60, 3)}
        ((model),) = snapshot["models"]
        assert model["version"] == "popularity-v1" and model["share"] == 1.0

        # The same numbers as `interest lag` (committed, end, lag per partition).
        listed = table_rows(interest("lag", "--group", settings.group_id).stdout.decode())
        for (topic, partition), p in partitions(snapshot).items():
            committed = "-" if p["committed"] is None else str(p["committed"])
            assert [topic, str(partition), committed, str(p["end"]), str(p["lag"])] in listed

        worker.kill()
        with InterestClient(settings) as client:
            client.push(list(sample_events(users=6, events_per_user=2, items=40, seed=9)))

        def stuck(snapshot: dict[str, Any]) -> bool:
            lagging = [p for p in partitions(snapshot).values() if p["lag"] > 0]
            return bool(lagging) and all(p["status"] in ("STALL", "STOP") for p in lagging)

        snapshot = collect_until(collector, stuck, 30, "the lagging partitions to stall")
        lagging = [p for p in partitions(snapshot).values() if p["lag"] > 0]
        assert all(p["lag_seconds"] is not None and p["lag_seconds"] > 0 for p in lagging)
        assert snapshot["groups"][0]["status"] in ("STALL", "STOP")
        assert len(snapshot["history"]["t"]) == len(snapshot["history"]["lag"]) > 5
    finally:
        collector.close()


def test_bad_addresses_and_groups_get_one_clear_line(settings: Settings) -> None:
    unknown = Collector(settings, ["nobody-here"], interval_seconds=1)
    try:
        snapshot = unknown.collect()
        assert "consumer group 'nobody-here' has committed no offsets" in snapshot["error"]
    finally:
        unknown.close()
    wrong = settings.model_copy(update={"bootstrap_servers": "127.0.0.1:9"})
    unreachable = Collector(wrong, [settings.group_id], interval_seconds=1)
    try:
        snapshot = unreachable.collect()
        assert snapshot["error"].startswith("cannot reach Kafka at 127.0.0.1:9")
        assert snapshot["groups"] == []
    finally:
        unreachable.close()
    result = interest("lag", env={"INTEREST_BOOTSTRAP_SERVERS": "127.0.0.1:9"})
    assert result.returncode == 2
    assert (
        result.stderr.decode()
        .strip()
        .endswith("cannot reach Kafka at 127.0.0.1:9 (KafkaTimeoutError)")
    )
    assert b"Traceback" not in result.stderr


def test_the_server_serves_its_page_status_and_metrics_and_refuses_the_rest(
    settings: Settings,
) -> None:
    async def main() -> None:
        app = create_monitor_app(settings, [settings.group_id], interval_seconds=0.2)
        async with TestClient(TestServer(app)) as client:
            wait_until = time.monotonic() + 30
            while (response := await client.get("/api/status")).status == 503:
                assert time.monotonic() < wait_until
                await asyncio.sleep(0.2)
            status = await response.json()
            assert status["groups"][0]["group"] == settings.group_id
            page = await client.get("/")
            assert page.status == 200 and "text/html" in page.headers["Content-Type"]
            assert "/static/monitor.js" in await page.text()
            assert (await client.get("/static/monitor.js")).status == 200
            metrics = await (await client.get("/metrics")).text()
            assert f'kafka_consumergroup_lag{{consumergroup="{settings.group_id}"' in metrics
            for path in ("/static/..%2Fserver.py", "/static/.hidden", "/etc/passwd", "/api"):
                assert (await client.get(path)).status == 404, path
            assert (await client.post("/api/status")).status == 405
            assert (await client.delete("/")).status == 405

    asyncio.run(main())


def test_the_worker_reports_ready_with_its_model_once_it_runs(
    settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    from streams.stack import free_port
    from tests.streams.test_health import get

    def ready() -> bool:
        try:
            return get(port, "/readyz")[0] == 200
        except OSError:  # not listening yet
            return False

    port = free_port()
    worker = start_worker(INTEREST_METRICS_PORT=str(port))
    wait_for(ready, 60, "the worker to be ready")
    assert json.loads(get(port, "/readyz")[1]) == {"ready": True, "model_version": "popularity-v1"}
    assert b'interest_model_info{version="popularity-v1"} 1.0' in get(port, "/metrics")[1]
    worker.stop()


def test_lag_watch_redraws_the_same_numbers_in_the_terminal(settings: Settings) -> None:
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    with InterestClient(settings) as client:
        client.push(list(sample_events(users=3, events_per_user=2, items=10)))
    command = ["lag", "--watch", "--interval", "0.5"]
    watching = subprocess.Popen(
        [sys.executable, "-c", "from interest.cli import main; main()", *command],
        env={**os.environ, "COLUMNS": "160"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    time.sleep(8)
    watching.send_signal(signal.SIGINT)  # Ctrl-C: leaves quietly
    out, err = watching.communicate(timeout=20)
    assert watching.returncode == 0, err.decode()
    text = out.decode()
    collector = Collector(settings, [settings.group_id], interval_seconds=1)
    try:
        snapshot = collector.collect()
    finally:
        collector.close()
    rows = table_rows(text)
    for (topic, partition), p in partitions(snapshot).items():
        expected = [topic, str(partition), "-", str(p["end"]), str(p["lag"])]
        assert any(row[:5] == expected for row in rows), text[-3000:]
    assert "STOP" in text or "STALL" in text or "OK" in text
    assert "latency p50" in text
