"""Several worker processes under one command: `interest worker --processes N`.

Why processes, not threads: a worker's batch work is Python (validation, windows, payloads)
holding the GIL, so threads in one interpreter would take turns on one core. N processes
each run the whole worker (`run_worker`) and join the same consumer group
(INTEREST_GROUP_ID); Kafka's group protocol splits the input partitions among them.

Per-user order still holds: a user's events are keyed to one partition (clicks and purchases
co-partitioned, streams/topics.py), and the group gives each partition to one member at a
time; a moved partition resumes from its committed offset, and replays are idempotent.

The supervisor is small on purpose: it starts the children (spawned, so none inherits a
half-started event loop or Kafka client), gives child ``i`` its own metrics/health port
(INTEREST_METRICS_PORT + i; 0 stays disabled), Kafka client id and log prefix, forwards
SIGTERM/SIGINT and waits for the children's graceful shutdown. A child that dies unexpectedly
is restarted after a backoff: its partitions would otherwise move to the others for good, and
the group would run on fewer processes than asked for. A supervisor killed outright (SIGKILL)
leaves its children running; a container runtime stops them with it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from common.errors import UserError
from streams.logs import configure_logging
from streams.settings import Settings
from streams.topics import admin_client, ensure_topics

log = logging.getLogger(__name__)

# Restart backoff: 1 s, doubling with each death of a child in a row, up to this many seconds
# (a child that cannot start, say for a wrong setting, retries without spinning).
RESTART_MAX_SECONDS = 30.0
# A child that ran this long before dying starts the backoff afresh.
HEALTHY_SECONDS = 60.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_workers(settings: Settings, processes: int) -> None:
    """Run ``processes`` workers in one consumer group until SIGTERM/SIGINT."""
    configure_logging(settings)
    ensure_topics(settings)  # once, before the children race to create the topics
    partitions = input_partitions(settings)
    if processes > partitions:
        log.warning(
            "%d worker processes for %d input partitions: %d will stay idle",
            processes,
            partitions,
            processes - partitions,
        )
    supervisor = Supervisor(settings, processes)
    previous = {sig: signal.signal(sig, supervisor.request_stop) for sig in STOP_SIGNALS}
    try:
        supervisor.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def input_partitions(settings: Settings) -> int:
    """Partitions of the clicks topic (purchases has as many: ensure_topics checks)."""
    admin = admin_client(settings)
    try:
        (topic,) = admin.describe_topics([settings.topic_clicks])
        return len(topic["partitions"])
    finally:
        admin.close()


def child_settings(settings: Settings, index: int) -> Settings:
    """Child ``index``'s settings: its own metrics port, everything else shared."""
    port = settings.metrics_port + index if settings.metrics_port else 0
    return settings.model_copy(update={"metrics_port": port})


class Supervisor:
    """Keeps one worker process running in each of N slots until asked to stop."""

    def __init__(self, settings: Settings, processes: int) -> None:
        self.settings = settings
        self.context = multiprocessing.get_context("spawn")
        self.children: list[BaseProcess | None] = [None] * processes
        self.started_at = [0.0] * processes
        self.deaths_in_a_row = [0] * processes
        self.due = [0.0] * processes  # when an empty slot starts its child
        self.stopping = False
        self.signalled: set[int | None] = set()  # pids already sent SIGTERM

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: only a flag, the loop forwards it (a child may be starting)."""
        self.stopping = True

    def run(self) -> None:
        while True:
            if self.stopping:
                self._forward_stop()
                if not any(self.children):
                    return
            else:
                self._start_due()
            live = [child.sentinel for child in self.children if child is not None]
            wait(live, timeout=0.5)  # wakes when a child exits
            for index, child in enumerate(self.children):
                if child is not None and not child.is_alive():
                    self._reap(index, child)

    def _start_due(self) -> None:
        now = time.monotonic()
        for index, child in enumerate(self.children):
            if child is None and now >= self.due[index]:
                settings = child_settings(self.settings, index)
                process = self.context.Process(
                    target=run_child, args=(settings, index), name=f"worker-{index}"
                )
                process.start()
                self.children[index] = process
                self.started_at[index] = now
                log.info(
                    "worker %d started: pid %d, metrics port %d",
                    index,
                    process.pid,
                    settings.metrics_port,
                )

    def _forward_stop(self) -> None:
        for child in self.children:
            if child is not None and child.pid not in self.signalled:
                self.signalled.add(child.pid)
                child.terminate()  # SIGTERM: the worker's graceful shutdown

    def _reap(self, index: int, child: BaseProcess) -> None:
        child.join()
        self.children[index] = None
        if self.stopping:
            log.info("worker %d (pid %d) stopped with code %s", index, child.pid, child.exitcode)
            return
        ran = time.monotonic() - self.started_at[index]
        deaths = 1 if ran >= HEALTHY_SECONDS else self.deaths_in_a_row[index] + 1
        self.deaths_in_a_row[index] = deaths
        delay = min(RESTART_MAX_SECONDS, 2.0 ** (deaths - 1))
        self.due[index] = time.monotonic() + delay
        log.warning(
            "worker %d (pid %d) exited with code %s after %.0f s; restarting it in %.1f s",
            index,
            child.pid,
            child.exitcode,
            ran,
            delay,
        )


def run_child(settings: Settings, index: int) -> None:
    """One child: the worker, told apart from its siblings in the broker and in the logs."""
    from streams.worker import run_worker  # only children pay for faust and the model

    # faust's own setting: the client id the broker and group descriptions show.
    os.environ["BROKER_CLIENT_ID"] = f"{settings.group_id}-{index}"
    prefix_log_records(f"worker-{index}")
    try:
        run_worker(settings)
    except UserError as exc:
        print(f"error: worker {index}: {exc}", file=sys.stderr)
        sys.exit(2)


def prefix_log_records(prefix: str) -> None:
    """Start every log message of this process with ``prefix`` (in text and JSON lines alike:
    the children share the supervisor's output)."""
    make_record = logging.getLogRecordFactory()

    def record(*args: object, **kwargs: object) -> logging.LogRecord:
        made = make_record(*args, **kwargs)
        made.msg = f"{prefix}: {made.msg}"
        return made

    logging.setLogRecordFactory(record)
