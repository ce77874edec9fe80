"""The main job on the embedded default: stack up, worker running, events in, recommendations out.

Everything runs in a private temporary home, so it never touches a stack started by
`interest up`, and everything it started is stopped on exit or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console

from streams.client import InterestClient
from streams.sample import sample_events
from streams.settings import Settings
from streams.stack import StackInfo, start_stack, stop_process, stop_stack
from streams.topics import ensure_topics


def train_small_model(home: Path, console: Console) -> Path | None:
    """Train and export a small encoder on a synthetic history; None without the train extra."""
    try:
        from encoder.train import train
        from export.bundle import export_bundle
    except ImportError:
        console.print("torch is not installed (pip install -e .[train]): serving popularity")
        return None
    history = home / "history.jsonl"
    with history.open("w") as out:
        for event in sample_events(users=300, events_per_user=30, items=200, seed=11):
            out.write(json.dumps(event) + "\n")
    console.print("training a small encoder on a synthetic history (a few seconds)...")
    summary = train(data=history, out=home / "model", epochs=8, progress=False, d_model=32, span=16)
    ndcg = summary["best_val_ndcg@10"]
    console.print(f"trained in {summary['train_minutes']} min, validation ndcg@10 {ndcg}")
    return export_bundle(model_dir=home / "model", out=home / "bundle")


def run_demo(users: int = 20, events_per_user: int = 10, show: int = 40) -> int:
    """Returns the number of recommendation events received."""
    console = Console(stderr=True)
    home = Path(tempfile.mkdtemp(prefix="interest-demo-"))
    worker: subprocess.Popen[bytes] | None = None
    try:
        info = start_stack(home)
        console.print(f"stack up: kafka {info.bootstrap_servers}, redis {info.redis_url}")
        env = {**os.environ, "INTEREST_HOME": str(home), "INTEREST_METRICS_PORT": "0"}
        bundle = train_small_model(home, console)
        if bundle is not None:
            env["INTEREST_MODEL"] = str(bundle)
        settings = Settings(home=home, **_recorded(info))
        ensure_topics(settings)
        worker = subprocess.Popen(
            [sys.executable, "-c", "from interest.cli import main; main()", "worker"],
            env=env,
            stdout=(home / "worker.log").open("ab"),
            stderr=subprocess.STDOUT,
        )
        console.print(f"worker started (pid {worker.pid}); log {home / 'worker.log'}")
        events = list(sample_events(users=users, events_per_user=events_per_user))
        received = 0
        with InterestClient(settings) as client:
            pusher = threading.Thread(target=_push_paced, args=(client, events), daemon=True)
            pusher.start()
            # The demo's topics are new, so reading from the beginning misses nothing.
            for rec in client.subscribe(limit=len(events), timeout=120, from_beginning=True):
                received += 1
                if received <= show:
                    items = ", ".join(
                        f"{item['item_id']} ({item['score']:.2f})" for item in rec["items"][:5]
                    )
                    print(f"{rec['user_id']} [{rec['source']}] <- {items}", flush=True)
            pusher.join()
        console.print(f"{received} recommendation events for {len(events)} pushed events")
        return received
    finally:
        if worker is not None:
            stop_process(worker)
        stop_stack(home)


def _recorded(info: StackInfo) -> dict[str, object]:
    names = (
        "bootstrap_servers",
        "redis_url",
        "kafka_max_poll_interval_seconds",
        "kafka_session_timeout_seconds",
    )
    return {name: getattr(info, name) for name in names}


def _push_paced(client: InterestClient, events: list[dict[str, object]]) -> None:
    for start in range(0, len(events), 20):
        client.push(events[start : start + 20])
        time.sleep(0.05)
