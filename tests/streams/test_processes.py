"""`interest worker --processes 3` on 8 partitions, on the real embedded broker and Redis: the
partitions split among the three, each user's recommendations in the order of its events, and
a child SIGKILLed while events flow is restarted with nothing lost or applied twice."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streams.client import InterestClient
from streams.processes import child_settings, prefix_log_records
from streams.sample import sample_events
from streams.settings import Settings
from streams.topics import ensure_topics
from tests.conftest import REPO_ROOT, WorkerProcess, interest, read_records, wait_for
from tests.streams.test_worker import applied, assert_every_event_applied_once

INTEREST = [sys.executable, "-c", "from interest.cli import main; main()"]
PROCESSES = 3
PARTITIONS = 8
USERS, STEPS = 40, 30


def free_port_run(n: int) -> int:
    """The first of ``n`` consecutive free ports (child i serves metrics on base + i)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            base = int(sock.getsockname()[1])
        if base + n < 65536 and all(_free(base + i) for i in range(n)):
            return base


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def env(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This test's settings with 8-partition topics and a metrics port per child."""
    extra = {
        "INTEREST_TOPIC_PARTITIONS": str(PARTITIONS),
        "INTEREST_METRICS_PORT": str(free_port_run(PROCESSES)),
    }
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    return {**service_env, **extra}


@pytest.fixture
def settings8(env: dict[str, str]) -> Settings:
    loaded = Settings()
    ensure_topics(loaded)  # before the worker, so the topics have 8 partitions
    return loaded


class SupervisorProcess(WorkerProcess):
    """`interest worker --processes N` in a subprocess; its log names each child's pid."""

    def start(self) -> SupervisorProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*INTEREST, "worker", "--processes", str(PROCESSES)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
            )
        return self

    def child_pids(self) -> dict[int, int]:
        """The pid each child slot last started."""
        started = re.findall(r"worker (\d+) started: pid (\d+)", self.log())
        return {int(index): int(pid) for index, pid in started}


@pytest.fixture
def supervisor(env: dict[str, str], tmp_path: Path) -> Iterator[SupervisorProcess]:
    process = SupervisorProcess(env, tmp_path / "supervisor.log").start()
    yield process
    process.stop()


def assigned(port: int, topic: str) -> int:
    """The child's ``interest_assigned_partitions`` for ``topic`` (0 until it serves one)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    except OSError:
        return 0
    found = re.search(
        rf'^interest_assigned_partitions{{topic="{re.escape(topic)}"}} (\S+)$',
        text.decode(),
        re.MULTILINE,
    )
    return int(float(found.group(1))) if found else 0


def split(settings: Settings) -> list[int] | None:
    """Clicks partitions per child once each of the three holds some, all 8 together, and
    each as many of purchases (co-partitioned); else None."""
    ports = [settings.metrics_port + index for index in range(PROCESSES)]
    clicks = [assigned(port, settings.topic_clicks) for port in ports]
    purchases = [assigned(port, settings.topic_purchases) for port in ports]
    if all(clicks) and sum(clicks) == PARTITIONS and clicks == purchases:
        return clicks
    return None


def one_topic_events() -> list[dict[str, Any]]:
    """Sample events step by step across users, all on the clicks topic (purchases become
    views) so that each user's events have one order: their offsets in one partition."""
    events = list(sample_events(users=USERS, events_per_user=STEPS, items=100, seed=5))
    for event in events:
        if event["event_type"] == "purchase":
            event["event_type"] = "view"
    return events


def assert_per_user_order(settings: Settings, events: list[dict[str, Any]]) -> None:
    """Each user's recommendations, first copies only (a replay republishes a few), follow the
    order of its events: the partition's one owner at a time applied them in order."""
    records = read_records(settings, settings.topic_recommendations, len(events), timeout=30)
    seen: dict[str, list[str]] = {}
    for record in records:
        payload = json.loads(record.value)
        triggers = seen.setdefault(payload["user_id"], [])
        if payload["trigger_event_id"] not in triggers:
            triggers.append(payload["trigger_event_id"])
    expected: dict[str, list[str]] = {}
    for event in events:
        expected.setdefault(event["user_id"], []).append(event["event_id"])
    assert seen == expected


def test_three_processes_split_partitions_keep_order_and_survive_a_sigkill(
    settings8: Settings, supervisor: SupervisorProcess
) -> None:
    settings = settings8
    events = one_topic_events()
    steps = [events[step * USERS : (step + 1) * USERS] for step in range(STEPS)]
    first, middle, last = steps[:10], steps[10:20], steps[20:]

    counts = wait_for(lambda: split(settings), 60, "the group to split 8 partitions among 3")
    assert sorted(counts) == [2, 3, 3], counts  # type: ignore[arg-type]
    with InterestClient(settings) as client:
        for step in first:
            client.push(step)
    pushed = sum(len(step) for step in first)
    wait_for(lambda: applied(settings) >= pushed, 30, "the first steps applied")

    victim = supervisor.child_pids()[1]
    with InterestClient(settings) as client:
        for number, step in enumerate(middle):
            client.push(step)
            if number == len(middle) // 2:
                os.kill(victim, signal.SIGKILL)
            time.sleep(0.05)
    wait_for(
        lambda: supervisor.child_pids()[1] != victim,
        20,
        "the supervisor to restart the killed child",
    )
    assert f"worker 1 (pid {victim}) exited with code -{int(signal.SIGKILL)}" in supervisor.log()
    wait_for(lambda: split(settings), 60, "the restarted child to rejoin the split")
    with InterestClient(settings) as client:
        for step in last:
            client.push(step)
    wait_for(lambda: applied(settings) >= len(events), 60, "every event applied")

    assert_every_event_applied_once(settings, events)
    assert_per_user_order(settings, events)
    assert supervisor.process is not None and supervisor.process.poll() is None


def test_fewer_than_one_process_is_refused_in_one_line() -> None:
    result = interest("worker", "--processes", "0")
    assert result.returncode == 2
    assert result.stderr.decode().strip() == "error: --processes must be at least 1, not 0"


def test_each_child_has_its_own_metrics_port_and_zero_stays_disabled() -> None:
    base = Settings(metrics_port=9200, bootstrap_servers="127.0.0.1:9")
    assert [child_settings(base, i).metrics_port for i in range(3)] == [9200, 9201, 9202]
    assert child_settings(base, 2).group_id == base.group_id  # one consumer group
    off = base.model_copy(update={"metrics_port": 0})
    assert child_settings(off, 2).metrics_port == 0


def test_a_childs_log_lines_start_with_its_name(caplog: pytest.LogCaptureFixture) -> None:
    factory = logging.getLogRecordFactory()
    try:
        prefix_log_records("worker-2")
        with caplog.at_level(logging.INFO):
            logging.getLogger("probe").info("assigned %d partitions", 3)
    finally:
        logging.setLogRecordFactory(factory)
    assert caplog.messages == ["worker-2: assigned 3 partitions"]


def test_more_processes_than_partitions_is_allowed_with_a_warning(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from streams import processes

    started: list[int] = []
    monkeypatch.setattr(processes, "configure_logging", lambda settings: None)  # keeps caplog's
    monkeypatch.setattr(
        processes.Supervisor, "run", lambda self: started.append(len(self.children))
    )
    with caplog.at_level(logging.WARNING):
        processes.run_workers(settings, 5)
    assert started == [5]
    assert "5 worker processes for 4 input partitions: 1 will stay idle" in caplog.messages
