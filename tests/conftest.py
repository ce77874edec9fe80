"""Shared fixtures: the real embedded stack (same launcher as `interest up`) and worker processes.

One broker and one Redis serve the whole session; each test gets its own topics, consumer group
and Redis key prefix, so tests cannot see each other's data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from streams.settings import Settings
from streams.stack import StackInfo, start_stack, stop_process, stop_stack

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    home = tmp_path_factory.mktemp("stack")
    info = start_stack(home)
    try:
        yield info
    finally:
        stop_stack(home)


@pytest.fixture
def service_env(
    stack: StackInfo, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> dict[str, str]:
    """INTEREST_* variables isolating this test; also applied to this process's environment."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    env = {
        "INTEREST_HOME": stack.home,
        "INTEREST_TOPIC_CLICKS": f"{prefix}.clicks",
        "INTEREST_TOPIC_PURCHASES": f"{prefix}.purchases",
        "INTEREST_TOPIC_RECOMMENDATIONS": f"{prefix}.recommendations",
        "INTEREST_TOPIC_DLQ": f"{prefix}.dlq",
        "INTEREST_GROUP_ID": prefix,
        "INTEREST_REDIS_KEY_PREFIX": prefix,
        "INTEREST_METRICS_PORT": "0",
        "INTEREST_LOG_LEVEL": "INFO",  # worker logs go to files in tmp_path
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def settings(service_env: dict[str, str]) -> Settings:
    from streams.topics import ensure_topics

    loaded = Settings()
    ensure_topics(loaded)
    return loaded


def interest(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run the `interest` command line as a user would (environment: this test's settings)."""
    return subprocess.run(
        [sys.executable, "-c", "from interest.cli import main; main()", *args],
        env={**os.environ, **(env or {})},
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


class WorkerProcess:
    """`interest worker` in a subprocess, as an operator would run it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from interest.cli import main; main()", "worker"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
        return self

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, no final offset commit."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_worker(
    service_env: dict[str, str], settings: Settings, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(**extra_env: str) -> WorkerProcess:
        log = tmp_path / f"worker-{len(workers)}.log"
        worker = WorkerProcess({**service_env, **extra_env}, log).start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2
) -> object:
    """Poll until condition() is truthy; fail the test with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def read_records(
    settings: Settings, topic: str, expected: int = 0, timeout: float = 10.0
) -> list[ConsumerRecord]:
    """Every record on `topic`: at least `expected` and everything the topic held when called
    (a replay's duplicates count towards `expected`, so that alone could stop short), polling
    until then (or timeout), then once more so that extra records (a bug) are seen too."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        enable_auto_commit=False,
        **settings.kafka_client_options(),
    )
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout

        def short() -> bool:
            behind = any(consumer.position(tp) < end for tp, end in ends.items())
            return len(records) < expected or behind

        while short() and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        for batch in consumer.poll(timeout_ms=300).values():
            records.extend(batch)
        return records
    finally:
        consumer.close()


def read_json(
    settings: Settings, topic: str, expected: int = 0, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """The JSON records of `topic` (tombstones, a forgotten user's, left out)."""
    records = read_records(settings, topic, expected, timeout)
    return [json.loads(r.value) for r in records if r.value is not None]


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is missing (licensed data is never committed to this repository)")
    return path
