"""The operations page in headless Chromium, against `interest monitor`, a real worker and the
embedded broker: what it shows equals /api/status and `interest lag`, a stopped worker turns its
partitions to STALL or STOP, and the page asks nothing of any host but the monitor's."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from streams.client import InterestClient
from streams.sample import sample_events
from streams.settings import Settings
from streams.stack import stop_process
from tests.conftest import REPO_ROOT, WorkerProcess, interest, wait_for

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"  # Debian's package: the tests never download a browser
# A closed network: no update checks, no component downloads, no GPU on the test machines.
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
INTERVAL = 1.0  # the monitor's refresh, seconds
# One refresh of the page: its poll period plus a fetch and a render on a loaded machine.
ONE_REFRESH_MS = int((INTERVAL + 1.5) * 1000)
# The picture README.md shows; rewritten only when asked (INTEREST_UPDATE_SCREENSHOT=1), so a
# test run leaves the checkout as it was.
README_SCREENSHOT = REPO_ROOT / "docs" / "monitor.png"
NUMBERS = ("committed", "end", "lag")

# Everything the page shows about partitions and tiles, read in one go: the page renders a
# snapshot synchronously, so one evaluation never mixes two snapshots.
READ_PAGE = """() => {
  const cell = (node) => node ? {value: node.dataset.value ?? null, text: node.textContent,
                                 title: node.title || null} : null;
  const rows = [...document.querySelectorAll('tr[data-partition]')].map((row) => ({
    group: row.dataset.group, topic: row.dataset.topic, partition: Number(row.dataset.partition),
    cells: Object.fromEntries([...row.querySelectorAll('[data-field]')]
                              .map((node) => [node.dataset.field, cell(node)])),
  }));
  const tiles = Object.fromEntries(
    ['events_in_per_s', 'recommendations_out_per_s', 'p50_ms', 'p99_ms']
      .map((name) => [name, cell(document.querySelector(`.tiles [data-field="${name}"]`))]));
  const byKey = (selector, key) => Object.fromEntries([...document.querySelectorAll(selector)]
      .map((node) => [node.dataset[key], cell(node)]));
  return {
    generated_at: Number(document.body.dataset.generatedAt || 0),
    rows, tiles,
    dead_letters: byKey('[data-field="dead_letters_per_s"]', 'reason'),
    hit_rates: byKey('[data-field="hit_rate"]', 'version'),
  };
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MonitorProcess:
    """`interest monitor` in a subprocess, as an operator would run it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        args = ["--host", "127.0.0.1", "--port", str(self.port), "--interval", str(INTERVAL)]
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from interest.cli import main; main()", "monitor", *args],
            env={**os.environ, **env},
            stdout=log_path.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )

    def get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def status(self, timeout: float = 60) -> dict[str, Any]:
        """The latest snapshot, once there is one (the server answers 503 until then)."""
        body = wait_for(lambda: self.get("/api/status"), timeout, f"a snapshot\n{self.log()}")
        return json.loads(body)

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, f"interest monitor exited\n{self.log()}"
            return self.get("/healthz") is not None

        wait_for(ready, timeout, f"interest monitor on port {self.port}")

    def stop(self) -> None:
        stop_process(self.process)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_monitor(
    service_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., MonitorProcess]]:
    monitors: list[MonitorProcess] = []

    def start(**extra_env: str) -> MonitorProcess:
        log = tmp_path / f"monitor-{len(monitors)}.log"
        monitor = MonitorProcess({**service_env, **extra_env}, log)
        monitors.append(monitor)
        monitor.wait_ready()
        return monitor

    yield start
    for monitor in monitors:
        monitor.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: install Debian's chromium (make setup)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=LAUNCH_ARGS, timeout=30_000
        )
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class WatchedPage:
    """A page with every URL it requested and every script error it raised."""

    page: Page
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def read(self) -> dict[str, Any]:
        return self.page.evaluate(READ_PAGE)

    def assert_clean(self, host: str = "127.0.0.1") -> None:
        outside = [url for url in self.requests if urlparse(url).hostname != host]
        assert not outside, f"the page requested hosts other than {host}: {outside}"
        assert not self.errors, f"script errors on the page: {self.errors}"


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[[str], WatchedPage]]:
    contexts = []

    def open_(url: str) -> WatchedPage:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        contexts.append(context)
        watched = WatchedPage(context.new_page())
        watched.page.on("request", lambda request: watched.requests.append(request.url))
        watched.page.on("pageerror", lambda error: watched.errors.append(str(error)))
        watched.page.set_default_timeout(15_000)
        watched.page.goto(url, wait_until="load")
        return watched

    yield open_
    for context in contexts:
        context.close()


def shown_int(cell: dict[str, Any], expected: int | None, what: str) -> None:
    """The text a person reads and the raw value both say `expected` (a dash when unknown)."""
    assert cell is not None, f"{what}: not on the page"
    raw = "" if expected is None else str(expected)
    text = "—" if expected is None else str(expected)
    assert (cell["value"], cell["text"].replace(",", "")) == (raw, text), what


def shown_float(cell: dict[str, Any] | None, expected: float | None, what: str) -> None:
    assert cell is not None, f"{what}: not on the page"
    if expected is None:
        assert cell["value"] == "", what
    else:
        assert cell["value"] != "" and float(cell["value"]) == expected, (what, cell, expected)


def assert_page_shows(shown: dict[str, Any], snap: dict[str, Any]) -> None:
    """Every number and status of the snapshot, as the page shows it."""
    rows = {(r["group"], r["topic"], r["partition"]): r["cells"] for r in shown["rows"]}
    expected = {
        (g["group"], p["topic"], p["partition"]): p for g in snap["groups"] for p in g["partitions"]
    }
    assert set(rows) == set(expected)
    for key, partition in expected.items():
        cells = rows[key]
        for name in NUMBERS:
            shown_int(cells[name], partition[name], f"{name} of {key}")
        shown_float(cells["lag_seconds"], partition["lag_seconds"], f"lag_seconds of {key}")
        status = cells["status"]
        assert (status["text"], status["title"]) == (partition["status"], partition["reason"]), key
    rates, latency = snap["rates"], snap["latency"]
    for name in ("events_in_per_s", "recommendations_out_per_s"):
        shown_float(shown["tiles"][name], rates[name], name)
    for name in ("p50_ms", "p99_ms"):
        shown_float(shown["tiles"][name], latency[name], name)
    dead_letters = rates["dead_letters_per_s"]
    assert set(shown["dead_letters"]) == set(dead_letters)
    for reason, rate in dead_letters.items():
        shown_float(shown["dead_letters"][reason], rate, f"dead letters/s {reason}")
    assert set(shown["hit_rates"]) == {m["version"] for m in snap["models"]}
    for model in snap["models"]:
        shown_float(shown["hit_rates"][model["version"]], model["hit_rate"], model["version"])


def assert_page_matches_api(watched: WatchedPage, monitor: MonitorProcess) -> dict[str, Any]:
    """The page catches up with the API within one refresh and then shows exactly its snapshot."""
    first = monitor.status()
    watched.page.wait_for_function(
        "g => Number(document.body.dataset.generatedAt || 0) >= g",
        arg=first["generated_at"],
        timeout=ONE_REFRESH_MS,
    )

    def same_snapshot() -> tuple[dict[str, Any], dict[str, Any]] | None:
        shown = watched.read()
        snap = monitor.status()
        return (shown, snap) if shown["generated_at"] == snap["generated_at"] else None

    shown, snap = wait_for(same_snapshot, 10 * INTERVAL, "page and API on one snapshot", 0.05)
    assert_page_shows(shown, snap)
    return snap


def cli_lag(env: dict[str, str]) -> dict[tuple[str, int], tuple[int | None, int, int]]:
    """`interest lag`'s table, parsed: (topic, partition) -> (committed, end, lag)."""
    result = interest("lag", env={**env, "COLUMNS": "200"})
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃|").split("│")]
        if len(cells) == 5 and cells[1].isdigit():
            topic, partition, committed, end, lag = cells
            rows[topic, int(partition)] = (
                None if committed == "-" else int(committed),
                int(end),
                int(lag),
            )
    assert rows, out
    return rows


def assert_cli_agrees(env: dict[str, str], snap: dict[str, Any], group: str) -> None:
    (mine,) = [g for g in snap["groups"] if g["group"] == group]
    api = {(p["topic"], p["partition"]): tuple(p[n] for n in NUMBERS) for p in mine["partitions"]}
    assert cli_lag(env) == api


def group_rows(snap: dict[str, Any], group: str) -> list[dict[str, Any]]:
    return [p for g in snap["groups"] if g["group"] == group for p in g["partitions"]]


def push_spread(settings: Settings, events: list[Any], batches: int, pause: float) -> None:
    """Events in several batches, so that the rates and charts have a history to show."""
    with InterestClient(settings) as client:
        for i in range(batches):
            client.push(events[i::batches])
            time.sleep(pause)


def test_page_shows_lag_and_a_stopped_worker(
    settings: Settings,
    service_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    start_monitor: Callable[..., MonitorProcess],
    open_page: Callable[[str], WatchedPage],
    tmp_path: Path,
) -> None:
    group = settings.group_id
    worker = start_worker()
    monitor = start_monitor()
    watched = open_page(monitor.url + "/")

    events = list(sample_events(users=24, events_per_user=10, items=60))
    rejected = [b"not json", b"{broken", b"[]"]
    push_spread(settings, [*events, *rejected], batches=8, pause=0.5)
    pushed = len(events) + len(rejected)

    def consumed() -> bool:
        rows = group_rows(monitor.status(), group)
        done = all(p["lag"] == 0 and p["committed"] == p["end"] for p in rows)
        return bool(rows) and done and sum(p["end"] for p in rows) == pushed

    wait_for(consumed, 120, f"the worker to consume all {pushed} records\n{worker.log()}")
    wait_for(
        lambda: {r["cells"]["status"]["text"] for r in watched.read()["rows"]} == {"OK"},
        30,
        "every partition OK on the page once the worker caught up",
    )
    snap = assert_page_matches_api(watched, monitor)
    assert_cli_agrees(service_env, snap, group)

    worker.kill()
    late = [
        {**e, "event_id": f"late-{e['event_id']}"}
        for e in sample_events(users=24, events_per_user=3, items=60, seed=11)
    ]
    push_spread(settings, late, batches=3, pause=0.3)

    def stalled() -> bool:
        rows = watched.read()["rows"]
        lagging = [r["cells"] for r in rows if r["cells"]["lag"]["value"] not in ("", "0")]
        total = sum(int(c["lag"]["value"]) for c in lagging)
        stopped = all(c["status"]["text"] in ("STALL", "STOP") for c in lagging)
        return total == len(late) and stopped

    wait_for(stalled, 60, "STALL or STOP on every lagging partition after the worker died", 0.25)
    snap = assert_page_matches_api(watched, monitor)
    assert sum(p["end"] for p in group_rows(snap, group)) == pushed + len(late)
    assert_cli_agrees(service_env, snap, group)

    screenshot = tmp_path / "monitor.png"
    watched.page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("INTEREST_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(screenshot, README_SCREENSHOT)

    monitor.stop()
    banner = watched.page.locator('[data-field="server_error"]')
    banner.wait_for(state="visible", timeout=ONE_REFRESH_MS + 5000)
    assert "Cannot reach the monitor server" in banner.inner_text()
    watched.assert_clean()


def test_page_says_when_kafka_is_unreachable(
    service_env: dict[str, str],
    start_monitor: Callable[..., MonitorProcess],
    open_page: Callable[[str], WatchedPage],
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens there
    monitor = start_monitor(INTEREST_BOOTSTRAP_SERVERS=nowhere)
    watched = open_page(monitor.url + "/")
    banner = watched.page.locator('[data-field="error"]')

    def says_why() -> bool:
        error = monitor.status()["error"]
        return bool(error) and nowhere in error and banner.inner_text() == error

    wait_for(says_why, 60, f"the page to say that Kafka at {nowhere} is unreachable")
    assert banner.is_visible()
    assert watched.page.locator('[data-field="bootstrap_servers"]').inner_text() == nowhere
    watched.assert_clean()
