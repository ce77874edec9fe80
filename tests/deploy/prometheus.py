"""A real Prometheus for the tests: started on a loopback port with a generated config, queried
through its HTTP API, stopped with its children gone. Also the dashboard's queries, read from the
JSON Grafana loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from streams.stack import free_port, stop_process
from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "interest-stream.json"
READY_TIMEOUT_SECONDS = 20.0


def binary(name: str) -> str:
    """The path of a Debian `prometheus` package binary; a clear failure where it is missing."""
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: `make setup` installs Debian's prometheus package")
    return found


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def scrape_config(jobs: dict[str, list[str]], rule_files: list[str], interval: str) -> str:
    """A Prometheus config scraping each job's loopback targets. JSON is valid YAML, and no YAML
    library is among the project's dependencies."""
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": rule_files,
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": targets}]}
            for job, targets in jobs.items()
        ],
    }
    return json.dumps(config, indent=2)


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> dict[str, Any]:
        """GET /api/v1/<path>; the decoded JSON body (Prometheus answers errors as JSON too)."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as reply:
                return json.load(reply)
        except urllib.error.HTTPError as error:
            return json.load(error)

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)


def start_prometheus(config: str, workdir: Path) -> PrometheusServer:
    """Prometheus on a free loopback port, its storage under workdir; returns once it is ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "prometheus.yml"
    config_file.write_text(config)
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = PrometheusServer(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not _ready(server):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process, grace_seconds=5)
            pytest.fail(f"prometheus did not become ready: {server.log()[-2000:]}")
        time.sleep(0.1)
    return server


def _ready(server: PrometheusServer) -> bool:
    try:
        with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in board.get("panels", []):
        yield panel
        yield from panels(panel)


def panel_queries(board: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL) of every target of every panel."""
    return [
        (panel["title"], target["refId"], target["expr"])
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variables replaced as Grafana would before sending the query; longest name
    first so that `$__rate_interval` is not read as `$__rate` followed by text."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", variables[name]).replace(f"${name}", variables[name])
    return expr
