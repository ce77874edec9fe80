"""A local Redis Cluster for development and tests: three masters, no replicas, on loopback.

It is the same redis-server in cluster mode that production clusters run, created with
`redis-cli --cluster create`, so the worker meets real MOVED/ASK redirections and per-slot
script rules here rather than first in production. `interest up --redis-cluster` starts one
in place of the single Redis.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from common.errors import UserError

MASTERS = 3
READY_TIMEOUT_SECONDS = 30.0


def redis_cli() -> str:
    found = shutil.which("redis-cli")
    if not found:
        raise UserError("redis-cli is not installed (Debian: apt-get install redis-tools)")
    return found


def server_argv(redis_bin: str, port: int, folder: Path) -> list[str]:
    """A development redis-server on loopback: nothing persisted, files in ``folder``."""
    return [
        redis_bin,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(folder),
        "--protected-mode",
        "yes",
    ]


def node_argv(redis_bin: str, port: int, bus_port: int, home: Path) -> list[str]:
    """One cluster node: its own config file and directory. The bus port is given rather than
    Redis's port + 10000, which may be taken or past 65535."""
    folder = home / f"redis-cluster-{port}"
    folder.mkdir(parents=True, exist_ok=True)
    cluster = ["--cluster-enabled", "yes", "--cluster-port", str(bus_port)]
    cluster += ["--cluster-config-file", str(folder / "nodes.conf")]
    return [*server_argv(redis_bin, port, folder), *cluster, "--cluster-node-timeout", "5000"]


def create_cluster(ports: list[int]) -> None:
    """Join the started nodes into one cluster, slots split evenly, and wait until every node
    says the cluster is ok (slots assigned and agreed on)."""
    nodes = [f"127.0.0.1:{port}" for port in ports]
    done = subprocess.run(
        [redis_cli(), "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise UserError(f"redis-cli --cluster create failed: {done.stdout[-400:]}{done.stderr}")
    _wait(lambda: all(_cluster_ok(port) for port in ports), "the Redis Cluster to agree")


def _cluster_ok(port: int) -> bool:
    done = subprocess.run(
        [redis_cli(), "-p", str(port), "cluster", "info"], capture_output=True, text=True
    )
    return "cluster_state:ok" in done.stdout


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise UserError(f"timed out waiting for {what}")
        time.sleep(0.1)
