"""Where a worker's micro-batch spends its time: BatchProcessor.process without Kafka.

Runs the worker's own batch function on ml-1m events (user-interleaved, as bench/stream.py
pushes them) against a private redis-server, with the encoder bundle and a publisher that only
encodes what it would send. Prints events/s and milliseconds per batch by stage, so a change to
the hot path can be measured without the broker's noise, and profiled with
`py-spy record -- python bench/batch.py`.

    python bench/batch.py [--model BUNDLE] [--events 60000] [--batch 500] [--default-gc]

The first pass over each user rebuilds its state from the window (cold); the numbers printed
are for batches after every user's state is cached (warm), the worker's steady state. --batch:
events per batch; the worker takes up to INTEREST_BATCH_SIZE from a backlog and far fewer at
moderate rates. The cost per event grows with the users' history, so compare runs with the
same --events.

Events come from ../shared/data/ml-1m.txt (never committed; where it is missing the bench says
so and exits 0). The bundle is found as bench/stream.py finds it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.stream import DATA, event_bytes, find_bundle, load_events  # noqa: E402
from streams.events import Source  # noqa: E402
from streams.messages import OutRecord, RawMessage  # noqa: E402
from streams.processor import BatchProcessor  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.stack import free_port, redis_binary, stop_process  # noqa: E402

TOPIC = "events.clicks"
PARTITIONS = 4


class EncodingPublisher:
    """Publisher that stops where the Kafka client would start: records are built, not sent."""

    def __init__(self) -> None:
        self.records = 0

    async def publish(self, records: Sequence[OutRecord]) -> None:
        self.records += len(records)


class StageTimer:
    """Wraps a processor's collaborators and adds up the seconds each one takes per batch."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap_async(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        return timed

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        return timed


def messages(n: int) -> list[RawMessage]:
    offsets = [0] * PARTITIONS
    out = []
    for user, item, rank in load_events(DATA, n):
        partition = zlib.crc32(user.encode()) % PARTITIONS  # stable across runs, unlike hash()
        out.append(
            RawMessage(
                user.encode(),
                event_bytes(user, item, rank, "b"),
                Source(TOPIC, partition, offsets[partition]),
            )
        )
        offsets[partition] += 1
    return out


async def run(settings: Settings, events: list[RawMessage], batch: int) -> None:
    from streams.model_watch import load_recommender
    from streams.redis_client import connect
    from streams.store import StateStore

    client = connect(settings)
    store = StateStore(client, settings)
    recommender = load_recommender(settings)
    publisher = EncodingPublisher()
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="inference")
    processor = BatchProcessor(settings, store, recommender, publisher, executor)
    timer = StageTimer()
    store.read_batch = timer.wrap_async("redis read", store.read_batch)  # type: ignore[method-assign]
    store.write_batch = timer.wrap_async("redis write", store.write_batch)  # type: ignore[method-assign]
    recommender.recommend = timer.wrap("recommend (thread)", recommender.recommend)  # type: ignore[method-assign]
    publisher.publish = timer.wrap_async("publish", publisher.publish)  # type: ignore[method-assign]

    users = len({m.key for m in events})
    warm_from = 0
    seen: set[bytes | None] = set()
    for i, m in enumerate(events):  # first batch after which every user has been stepped
        seen.add(m.key)
        if len(seen) == users:
            warm_from = (i // batch + 1) * batch
            break
    per_batch: list[float] = []
    stages: dict[str, list[float]] = defaultdict(list)
    for start in range(0, len(events), batch):
        chunk = events[start : start + batch]
        timer.seconds.clear()
        t0 = time.perf_counter()
        await processor.process(chunk)
        if start >= warm_from:
            total = time.perf_counter() - t0
            per_batch.append(total)
            accounted = 0.0
            for name, seconds in timer.seconds.items():
                stages[name].append(seconds)
                accounted += seconds
            stages["validate, windows, payloads (loop)"].append(total - accounted)
    await client.aclose()
    executor.shutdown()
    if not per_batch:
        print("not enough events for a warm batch; raise --events")
        return
    mean = statistics.fmean(per_batch)
    print(
        f"{len(per_batch)} warm batches of {batch} events ({users} users): "
        f"{batch / mean:,.0f} events/s, {mean * 1000:.1f} ms per batch"
    )
    for name, values in sorted(stages.items(), key=lambda kv: -statistics.fmean(kv[1])):
        ms = statistics.fmean(values) * 1000
        print(f"  {name:<38} {ms:7.1f} ms  {ms / (mean * 1000):5.1%}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--batch", type=int, default=500)
    default_workdir = Path(tempfile.gettempdir()) / "interest-bench-stream"  # bench/stream.py's
    ap.add_argument("--workdir", type=Path, default=default_workdir)
    ap.add_argument(
        "--default-gc",
        action="store_true",
        help="keep CPython's GC thresholds instead of the worker's (streams.worker.tune_gc)",
    )
    args = ap.parse_args()
    if not DATA.is_file():
        print(f"skipped: {DATA} not found (the data sets are not committed)")
        return 0
    bundle = find_bundle(args.workdir, args.model)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="interest-batch-") as tmp:
        redis = subprocess.Popen(
            [redis_binary(), "--port", str(port), "--save", "", "--appendonly", "no"],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.5)
            settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", model=bundle)
            events = messages(args.events)
            if not args.default_gc:
                from streams.worker import tune_gc

                tune_gc()  # as `interest worker` does
            asyncio.run(run(settings, events, args.batch))
        finally:
            stop_process(redis)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
