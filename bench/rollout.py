"""Model rollout under load: does pointing the worker at a new bundle stall the stream?

    python bench/rollout.py --model-a BUNDLE --model-b BUNDLE [--rate 2000] [--seconds 24]
                            [--worker-tree PATH]

Starts a private embedded stack and `interest worker` with INTEREST_MODEL = a symlink to
bundle A (polled every 0.5 s), produces ml-1m click events at --rate for --seconds, switches
the symlink to bundle B half way (as an operator would: a new link renamed over the old), and
prints the produce -> recommendation latency of the events sent from the switch until 2 s
after the send time of the first event B answered, against those sent before (after a 4 s
warm-up) and after; when B's first answer came; and whether every event got its
recommendation. The two bundles must differ (their versions are content hashes).
--worker-tree runs the worker from another checkout (side-by-side comparisons).

Why: loading a bundle (ONNX sessions, the state slab) takes seconds; if it happened where
batches wait for it, every event arriving meanwhile would wait too. The "around the rollout"
line against the "before" line shows whether a rollout is visible in the tail.

Events come from ../shared/data/ml-1m.txt (never committed; where it is missing the bench says
so and exits 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import stream as stream_bench  # events, the stack, the worker

WARM_UP_SECONDS = 4.0
SETTLE_SECONDS = 2.0


def _cut(latencies_ms: list[float]) -> str:
    if not latencies_ms:
        return "no events"
    cuts = stream_bench.percentiles(latencies_ms)
    return (
        f"p50 {cuts[49]:.1f} ms, p99 {cuts[98]:.1f} ms, max {max(latencies_ms):.1f} ms"
        f" ({len(latencies_ms):,} events)"
    )


async def run(
    bootstrap: str,
    topic: str,
    out_topic: str,
    events: list[tuple[str, str, int]],
    rate: float,
    seconds: float,
    link: Path,
    bundle_b: Path | None,
) -> dict[str, object]:
    """Produce at ``rate``, switch ``link`` to ``bundle_b`` half way (if given), collect the
    answers."""
    from aiokafka import AIOKafkaProducer

    consumer = await stream_bench.tail_reader(bootstrap, out_topic)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
    await producer.start()
    sent: dict[str, float] = {}  # trigger event id -> send time (perf_counter)
    answers: dict[str, tuple[float, str]] = {}  # trigger id -> (latency s, model version)
    done = asyncio.Event()

    async def receive() -> None:
        while not (done.is_set() and len(answers) >= len(sent)):
            batches = await consumer.getmany(timeout_ms=200)
            now = time.perf_counter()
            for records in batches.values():
                for record in records:
                    payload = json.loads(record.value)
                    trigger = payload["trigger_event_id"]
                    if trigger in sent:
                        answers[trigger] = (now - sent[trigger], payload["model_version"])

    receiver = asyncio.create_task(receive())
    n_total = min(len(events), int(rate * seconds))
    t0 = time.perf_counter()
    switched_at: float | None = None
    i = 0
    while i < n_total:
        now = time.perf_counter()
        if bundle_b is not None and switched_at is None and now - t0 >= seconds / 2:
            new_link = link.with_name(link.name + ".new")
            new_link.symlink_to(bundle_b)
            os.replace(new_link, link)
            switched_at = now
        due = int((now - t0) * rate) + 1
        while i < min(due, n_total):
            user, item, rank = events[i]
            value = stream_bench.event_bytes(user, item, rank, "roll")
            sent[f"roll-{user}-{rank}"] = time.perf_counter()
            await producer.send(topic, value, key=user.encode())
            i += 1
        await asyncio.sleep(0.01)
    await producer.flush()
    done.set()
    try:
        await asyncio.wait_for(receiver, 60)
    except TimeoutError:
        receiver.cancel()
    await producer.stop()
    await consumer.stop()
    switched_at = switched_at if switched_at is not None else time.perf_counter()
    version_b = bundle_version(bundle_b) if bundle_b is not None else None
    before: list[float] = []
    during: list[float] = []  # from the switch until SETTLE_SECONDS after B's first event
    after: list[float] = []
    versions = set()
    first_b: float | None = None  # the first event B answered: its send time after the switch
    first_b_answer: float | None = None  # B's first answer received, seconds after the switch
    for trigger, (latency_s, version) in answers.items():
        versions.add(version)
        since_switch = sent[trigger] - switched_at
        if version == version_b:
            if first_b is None or since_switch < first_b:
                first_b = since_switch
            answered = since_switch + latency_s
            if first_b_answer is None or answered < first_b_answer:
                first_b_answer = answered
    settled = (first_b if first_b is not None else float("inf")) + SETTLE_SECONDS
    for trigger, (latency_s, _) in answers.items():
        since_switch = sent[trigger] - switched_at
        if sent[trigger] - t0 < WARM_UP_SECONDS:
            continue
        part = before if since_switch < 0 else during if since_switch < settled else after
        part.append(1000 * latency_s)
    return {
        "sent": len(sent),
        "received": len(answers),
        "before": before,
        "during": during,
        "after": after,
        "first_b_s": first_b,
        "first_b_answer_s": first_b_answer,
        "versions": sorted(versions),
    }


def bundle_version(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["version"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-a", type=Path, required=True)
    ap.add_argument("--model-b", type=Path, required=True)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--seconds", type=float, default=24.0)
    ap.add_argument("--worker-tree", type=Path, default=stream_bench.REPO_ROOT)
    args = ap.parse_args()
    if not stream_bench.DATA.is_file():
        print(f"skipped: {stream_bench.DATA} not found (the data sets are not committed)")
        return
    for bundle in (args.model_a, args.model_b):
        if not (bundle / "manifest.json").is_file():
            sys.exit(f"error: {bundle} is not a bundle (no manifest.json)")
    if bundle_version(args.model_a) == bundle_version(args.model_b):
        sys.exit("error: the two bundles have the same version; export two different models")

    from streams.settings import Settings
    from streams.stack import free_port, start_stack, stop_process, stop_stack
    from streams.topics import ensure_topics

    events = stream_bench.load_events(stream_bench.DATA, int(args.rate * args.seconds) + 1)
    home = Path(tempfile.mkdtemp(prefix="interest-bench-rollout-"))
    worker = None
    try:
        info = start_stack(home)
        link = home / "current"
        link.symlink_to(args.model_a.resolve())
        tag = f"r{uuid.uuid4().hex[:6]}"
        port = free_port()
        env = {
            **stream_bench.stack_env(home, tag, port, link),
            "INTEREST_MODEL_POLL_SECONDS": "0.5",
        }
        os.environ.update(env)
        settings = Settings()
        ensure_topics(settings)
        log_path = home / "worker.log"
        worker = stream_bench.start_worker({**os.environ, **env}, log_path, args.worker_tree)
        # The group join takes seconds on the embedded broker: a first event, and its answer.
        print(f"worker {args.worker_tree} pid {worker.pid}; waiting for it to serve", flush=True)
        warm_up = asyncio.run(
            run(
                info.bootstrap_servers,
                settings.topic_clicks,
                settings.topic_recommendations,
                [("warm-up", "1", 0)],
                1,
                1,
                link,
                None,
            )
        )
        if warm_up["received"] != 1 or worker.poll() is not None:
            sys.exit(f"error: the worker did not answer its first event within 60 s ({log_path})")
        result = asyncio.run(
            run(
                info.bootstrap_servers,
                settings.topic_clicks,
                settings.topic_recommendations,
                events,
                args.rate,
                args.seconds,
                link,
                args.model_b.resolve(),
            )
        )
        if worker.poll() is not None:
            sys.exit(f"error: the worker exited during the run ({log_path})")
        print(f"at {args.rate:,.0f} events/s, switched to B at {args.seconds / 2:.0f} s:")
        print(f"  sent before the switch (after {WARM_UP_SECONDS:.0f} s): {_cut(result['before'])}")
        print(
            f"  sent from the switch until {SETTLE_SECONDS:.0f} s after the first event B answered:"
            f" {_cut(result['during'])}"
        )
        print(f"  sent later: {_cut(result['after'])}")
        first_b, first_answer = result["first_b_s"], result["first_b_answer_s"]
        if first_b is None or first_answer is None:
            print("  B answered no event")
        else:
            print(
                f"  B's first answer came {first_answer:.2f} s after the switch (for an event"
                f" sent {first_b:.2f} s after it)"
            )
        print(
            f"  received {result['received']:,}/{result['sent']:,}; versions"
            f" {', '.join(result['versions'])}",
            flush=True,
        )
    finally:
        if worker is not None:
            stop_process(worker)
        stop_stack(home)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
