"""Every query of the Grafana dashboard, run by a real Prometheus that scrapes a real worker and
`interest monitor` on the embedded stack while events flow: none may fail or come back empty.
The alert rules are loaded too, and must evaluate without error on the real series."""

from __future__ import annotations

import math
import time
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streams.client import InterestClient
from streams.sample import sample_events
from streams.settings import Settings
from streams.stack import free_port
from tests.conftest import WorkerProcess
from tests.deploy.prometheus import (
    ALERTS,
    PrometheusServer,
    dashboard,
    panel_queries,
    scrape_config,
    substitute,
)

pytestmark = pytest.mark.integration

READY_TIMEOUT_SECONDS = 60.0
N_ITEMS = 60
QUERIES_TIMEOUT_SECONDS = 60.0
# One of each reason the dashboard's dead-letter panel splits by.
INVALID = [
    b"not json",
    b'{"user_id": "u", "item_id": "i", "event_type": "like", "timestamp": 1700000000000}',
]


def fresh_events(round_: int) -> list[dict[str, Any]]:
    """The same users every round (so that the live hit rate has earlier recommendations to
    count against), with new ids and the current time."""
    now_ms = int(time.time() * 1000)
    events = list(sample_events(users=20, events_per_user=3, items=N_ITEMS, seed=round_))
    return [
        {**event, "event_id": f"r{round_}-{event['event_id']}", "timestamp": now_ms}
        for event in events
    ]


def encoder_bundle(tmp: Path) -> Path:
    """A small encoder over sample_events' items: the worker's model metrics (popularity bias
    among them) exist only where a model serves."""
    pytest.importorskip("torch", reason="needs the training extra (pip install -e .[train])")
    from export.bundle import export_bundle, save_model_dir
    from tests.export.conftest import tiny_model

    items = [f"item-{i}" for i in range(N_ITEMS)]
    model_dir = save_model_dir(tiny_model(n_items=N_ITEMS), items, tmp / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_bundle(model_dir=model_dir, out=tmp / "bundle")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def problem(server: PrometheusServer, title: str, ref: str, expr: str) -> str | None:
    """Why a query does not count as returning data, or None when it does."""
    reply = server.query(expr)
    if reply.get("status") != "success":
        return f"{title} [{ref}]: {reply.get('errorType')}: {reply.get('error')}\n  {expr}"
    values = [float(sample["value"][1]) for sample in reply["data"]["result"]]
    if not any(math.isfinite(value) for value in values):
        return f"{title} [{ref}]: {values or 'no series'}\n  {expr}"
    return None


def rule_problems(server: PrometheusServer) -> list[str]:
    """Alert rules not loaded, not evaluated yet, or failing on the real series."""
    groups = server.api("rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    if not rules:
        return [f"no alert rules loaded from {ALERTS}"]
    return [
        f"rule {rule['name']}: {rule['health']} {rule.get('lastError', '')}"
        for rule in rules
        if rule["health"] != "ok"
    ]


def logs(tmp_path: Path) -> str:
    """The tails of the processes' logs, for a failure message."""
    return "\n".join(
        f"--- {path.name}\n{path.read_text(errors='replace')[-1500:]}"
        for path in sorted(tmp_path.rglob("*.log"))
    )


def test_every_dashboard_query_returns_data_from_prometheus_scraping_worker_and_monitor(
    settings: Settings,
    service_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    start_monitor: Callable[..., Any],
    prometheus: Callable[[str], PrometheusServer],
    tmp_path: Path,
) -> None:
    worker_port, monitor_port = free_port(), free_port()
    worker = start_worker(
        INTEREST_METRICS_PORT=str(worker_port), INTEREST_MODEL=str(encoder_bundle(tmp_path))
    )
    monitor = start_monitor(monitor_port, "--interval", "1")
    server = prometheus(
        scrape_config(
            {
                "interest-worker": [f"127.0.0.1:{worker_port}"],
                "interest-monitor": [f"127.0.0.1:{monitor_port}"],
            },
            [str(ALERTS)],
            "1s",
        )
    )
    group = service_env["INTEREST_GROUP_ID"]
    # Grafana's variables as it fills them in: a rate window of a few scrapes at 1 s.
    variables = {"__rate_interval": "30s", "__interval": "5s", "__range": "5m"}
    variables["consumergroup"] = group
    queries = [
        (title, ref, substitute(expr, variables)) for title, ref, expr in panel_queries(dashboard())
    ]
    assert queries and not any("$" in expr for _, _, expr in queries)

    ready = time.monotonic() + READY_TIMEOUT_SECONDS
    while not http_ok(f"http://127.0.0.1:{worker_port}/readyz"):
        if worker.process.poll() is not None or time.monotonic() > ready:
            pytest.fail(f"the worker did not become ready:\n{logs(tmp_path)}")
        time.sleep(0.2)
    deadline = time.monotonic() + QUERIES_TIMEOUT_SECONDS
    with InterestClient(settings) as client:
        round_ = 0
        while True:
            client.push([*fresh_events(round_), *INVALID])
            round_ += 1
            problems = [p for q in queries if (p := problem(server, *q))]
            problems += rule_problems(server)
            if not problems:
                break
            if monitor.poll() is not None:
                pytest.fail(f"interest monitor exited with {monitor.returncode}:\n{logs(tmp_path)}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"queries without data after {QUERIES_TIMEOUT_SECONDS}s:\n"
                    + "\n".join(problems)
                    + f"\n{logs(tmp_path)}"
                )
            time.sleep(1)

    groups = server.api("label/consumergroup/values", **{"match[]": "kafka_consumergroup_lag"})
    assert group in groups["data"], "the dashboard's consumer group variable would not offer it"
    reasons = server.query("sum by (reason) (interest_dlq_total)")["data"]["result"]
    assert {r["metric"].get("reason") for r in reasons} >= {"not_json", "bad_event_type"}
