"""Fixtures for deploy/: `interest monitor` and Prometheus as subprocesses, stopped after a test."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from streams.stack import stop_process
from tests.conftest import REPO_ROOT
from tests.deploy.prometheus import PrometheusServer, start_prometheus

INTEREST = (sys.executable, "-c", "from interest.cli import main; main()")


@pytest.fixture
def start_monitor(
    service_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """`interest monitor --port P ...` with this test's settings; its output in tmp_path."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(port: int, *args: str) -> subprocess.Popen[bytes]:
        with (tmp_path / f"monitor-{len(processes)}.log").open("ab") as log:
            process = subprocess.Popen(
                [*INTEREST, "monitor", "--port", str(port), *args],
                env={**os.environ, **service_env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
            )
        processes.append(process)
        return process

    yield start
    for process in processes:
        stop_process(process, grace_seconds=10)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], PrometheusServer]]:
    """Start a Prometheus with the given config (storage in tmp_path); stopped at teardown."""
    servers: list[PrometheusServer] = []

    def start(config: str) -> PrometheusServer:
        server = start_prometheus(config, tmp_path / f"prometheus-{len(servers)}")
        servers.append(server)
        return server

    yield start
    for server in servers:
        stop_process(server.process, grace_seconds=10)
