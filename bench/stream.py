"""Streaming benchmark: client ceiling vs a naive worker vs `interest worker`, ml-1m events.

One run on a private embedded stack (Tansu + Redis in a temporary home, stopped at the end):

  (a) ceiling: aiokafka consume + json.loads of the clicks topic (4 partitions), events/s;
  (b) naive: per event a Redis GET/SET of the window, a full ONNX recompute of it at batch 1
      (EncoderRuntime.rebuild, no persisted memory), top-k, one awaited send; events/s over a
      bounded sample, in its own consumer group;
  (c) `interest worker` (subprocess, INTEREST_MODEL = the bundle, fresh group): sustained
      events/s over a backlog of N events (first to last recommendation, by the recommendation
      records' broker timestamps), then p50/p99 latency from produce to recommendation received
      while producing at half that rate. For both parts it prints the mean time per batch in
      each stage (the worker's ``interest_stage_seconds``: the stage with the largest mean
      bounds the batches per second), and for the backlog the CPU time per event of the
      worker, Redis and the broker (from /proc, from the first recommendation on).

With ``--processes 1 2 3`` it runs (d) instead: `interest worker --processes P` for each P in
turn, each on fresh topics (``--partitions`` each, by default the counts' least common
multiple, so that every process gets an equal share), a fresh group and fresh Redis keys,
draining the same backlog of N events; sustained events/s and CPU per event for each P, as a
table. P = 1 is the plain `interest worker` (no supervisor).

    python bench/stream.py [--events 150000] [--naive-events 2000] [--latency-seconds 25]
                           [--latency-rate R] [--worker-without-model]
    python bench/stream.py --processes 1 2 3 [--events 60000] [--partitions 6]
    python bench/stream.py --curve [--curve-points 0.1 0.25 0.5 0.75 0.9] [--point-seconds 30]
                           [--warmup-seconds 5] [--worker-core 0] [--harness-core 1]
                           [--compare-tree /tmp/base] [--json PATH] [--plot PATH]

With ``--curve`` it runs the latency curve instead (bench/stream_curve.py): the sustained rate
from a backlog, then the worker's part and end-to-end latency at fractions of it, the worker
pinned to a core of its own and everything else to another, a fresh stack for each point.

Events: ../shared/data/ml-1m.txt (SASRec `user item` lines; never committed, and where it is
missing the bench says so and exits 0) interleaved across users (each user's events in order,
user by user per rank), as click events with synthetic per-user timestamps. The bundle:
--model, else a cached export under --workdir, else an export of a model directory found under
/tmp/runs, else a quick training run (throughput does not depend on model quality).

The worker runs from the checkout this script is in: to compare two trees, run each tree's
copy in turn (`git worktree add`), alternating, with the same bundle; ``--curve`` takes
``--compare-tree`` and alternates itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from streams.stack import StackInfo

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
DATA = REPO_ROOT.parent / "shared" / "data" / "ml-1m.txt"
BASE_TS_MS = 1_700_000_000_000


def load_histories(path: Path) -> dict[str, list[str]]:
    """Each user's items in file order (SASRec's files are time-ordered per user)."""
    per_user: dict[str, list[str]] = {}
    with path.open() as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                per_user.setdefault(parts[0], []).append(parts[1])
    return per_user


def load_events(path: Path, n: int) -> list[tuple[str, str, int]]:
    """(user, item, rank) for the first n events in user-interleaved order."""
    per_user = load_histories(path)
    rows = [
        (rank, user, item) for user, items in per_user.items() for rank, item in enumerate(items)
    ]
    rows.sort(key=lambda r: (r[0], int(r[1]) if r[1].isdigit() else r[1]))
    return [(user, item, rank) for rank, user, item in rows[:n]]


def event_bytes(user: str, item: str, rank: int, tag: str) -> bytes:
    return orjson.dumps(
        {
            "event_id": f"{tag}-{user}-{rank}",
            "user_id": user,
            "item_id": item,
            "event_type": "click",
            "timestamp": BASE_TS_MS + rank * 60_000,
        }
    )


def find_bundle(workdir: Path, model: Path | None) -> Path:
    if model is not None:
        return model
    bundle = workdir / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    runs = Path("/tmp/runs")
    candidates = (
        sorted(
            (
                p
                for p in runs.glob("*")
                if all((p / f).is_file() for f in ("config.json", "model.pt", "vocab.json"))
            ),
            key=lambda p: p.stat().st_mtime,
        )
        if runs.is_dir()
        else []
    )
    if candidates:
        model_dir = candidates[-1]
        print(f"bundle: exporting {model_dir}", flush=True)
    else:
        from encoder.train import train

        model_dir = workdir / "model"
        print(
            "bundle: no trained model found; training a quick one (2 epochs, <= 3 min)", flush=True
        )
        train(data=DATA, out=model_dir, epochs=2, max_minutes=3, progress=False)
    from export.bundle import export_bundle  # torch: only when there is no bundle yet

    return export_bundle(model_dir=model_dir, out=bundle)


async def produce(
    bootstrap: str, topic: str, events: list[tuple[str, str, int]], tag: str
) -> float:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    t0 = time.perf_counter()
    try:
        pending = []
        for user, item, rank in events:
            pending.append(
                await producer.send(topic, event_bytes(user, item, rank, tag), key=user.encode())
            )
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - t0


def _consumer(bootstrap: str, **kw: object):
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False, **kw
    )


async def tail_reader(bootstrap: str, topic: str, fetch_max_wait_ms: int = 10):
    """A started consumer of every partition of ``topic``, from its end on."""
    from aiokafka import TopicPartition

    # A short fetch wait: the embedded broker answers a fetch late even when data arrives,
    # so the reader's own wait is added to every latency measured (aiokafka's default is
    # 500 ms).
    consumer = _consumer(
        bootstrap, max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_wait_ms=fetch_max_wait_ms
    )
    await consumer.start()
    parts = consumer.partitions_for_topic(topic)
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)
    return consumer


def stack_env(home: Path, tag: str, metrics_port: int, model: Path) -> dict[str, str]:
    """The worker's settings on a private stack: topics, group and keys of their own."""
    return {
        "INTEREST_HOME": str(home),
        "INTEREST_TOPIC_CLICKS": f"{tag}.clicks",
        "INTEREST_TOPIC_PURCHASES": f"{tag}.purchases",
        "INTEREST_TOPIC_RECOMMENDATIONS": f"{tag}.recommendations",
        "INTEREST_TOPIC_DLQ": f"{tag}.dlq",
        "INTEREST_GROUP_ID": f"{tag}-worker",
        "INTEREST_REDIS_KEY_PREFIX": tag,
        "INTEREST_METRICS_PORT": str(metrics_port),
        "INTEREST_MODEL": str(model),
    }


def start_worker(
    env: dict[str, str], log_path: Path, tree: Path = REPO_ROOT, processes: int = 1
) -> subprocess.Popen:
    """`interest worker` of the checkout ``tree`` as a child process, its output to
    ``log_path``; with ``processes`` > 1 the supervisor of that many workers."""
    scale = ["--processes", str(processes)] if processes > 1 else []
    with log_path.open("wb") as log:  # the child holds its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-c", "from interest.cli import main; main()", "worker", *scale],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tree,
        )


async def assign_all(consumer, topic: str) -> None:
    from aiokafka import TopicPartition

    await consumer.start()
    parts = consumer.partitions_for_topic(topic)
    while not parts:
        await asyncio.sleep(0.1)
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(topic)
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)


async def bench_ceiling(bootstrap: str, topic: str, n: int) -> float:
    """(a) aiokafka consume + json.loads of n events, events/s."""
    consumer = _consumer(
        bootstrap, max_partition_fetch_bytes=4 * 1024 * 1024, fetch_max_bytes=16 * 1024 * 1024
    )
    await assign_all(consumer, topic)
    loads = json.loads
    seen = 0
    t0 = time.perf_counter()
    try:
        while seen < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batches.values():
                for record in records:
                    loads(record.value)
                seen += sum(len(r) for r in batches.values())
    finally:
        await consumer.stop()
    return seen / (time.perf_counter() - t0)


async def bench_naive(
    bootstrap: str, redis_url: str, topic: str, out_topic: str, bundle: Path, n: int, k: int
) -> float:
    """(b) per event: Redis GET/SET, full recompute at batch 1, top-k, one awaited send."""
    import numpy as np
    import redis.asyncio as aioredis
    from aiokafka import AIOKafkaProducer

    from export.runtime import EncoderRuntime

    rt = EncoderRuntime.load(bundle, device="cpu")
    click = rt.event_types.index("click") if "click" in rt.event_types else 0
    r = aioredis.Redis.from_url(redis_url)
    prefix = f"naive-{uuid.uuid4().hex[:8]}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    consumer = _consumer(bootstrap, group_id=prefix, max_poll_records=100)
    consumer.subscribe([topic])
    await consumer.start()
    done = 0
    t0 = None
    try:
        while done < n:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    if done >= n:
                        break
                    if t0 is None:
                        t0 = time.perf_counter()
                    ev = json.loads(record.value)
                    key = f"{prefix}:w:{ev['user_id']}"
                    raw = await r.get(key)
                    window = json.loads(raw) if raw else []
                    window = [*window, [ev["item_id"], ev["timestamp"]]][-200:]
                    await r.set(key, json.dumps(window))
                    items = rt.index_of([w[0] for w in window])
                    ts = np.array([w[1] for w in window], dtype=np.int64)
                    gaps = np.clip(np.diff(ts, prepend=ts[0]) // 60_000, 0, rt.n_time_buckets - 1)
                    vec, _ = rt.rebuild([items], [np.full(len(items), click)], [gaps])
                    idx, scores = rt.top_k(vec, k, [items[items > 0]])
                    payload = {
                        "user_id": ev["user_id"],
                        "items": [
                            {"item_id": i, "score": float(s)}
                            for i, s in zip(rt.ids_of(idx[0]), scores[0], strict=True)
                        ],
                        "trigger_event_id": ev["event_id"],
                    }
                    await (
                        await producer.send(
                            out_topic, json.dumps(payload).encode(), key=ev["user_id"].encode()
                        )
                    )
                    done += 1
    finally:
        await consumer.stop()
        await producer.stop()
        await r.aclose()
    assert t0 is not None
    return done / (time.perf_counter() - t0)


def cpu_seconds(pid: int, children: bool = True) -> float:
    """CPU time (user + system) used so far by a process and, with ``children``, its running
    direct children, from /proc (any worker child process counts as the worker's)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            # after the command: state, ppid, ... utime (12th), stime (13th)
            if stat.parent.name == str(pid) or (children and fields[1] == str(pid)):
                total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _cpu_of(pids: dict[str, int]) -> dict[str, float]:
    """``cpu_seconds`` of each; this process without its children (the stack and the worker
    are its children, counted under their own names)."""
    return {name: cpu_seconds(pid, children=pid != os.getpid()) for name, pid in pids.items()}


def wait_recommended(
    ports: list[int], n: int, timeout: float, worker: subprocess.Popen, pids: dict[str, int]
) -> dict[str, float]:
    """Wait until the worker (the workers on ``ports``, summed) has published n recommendations
    (its own committed count);
    return the CPU seconds per event each of ``pids`` (and its children) used meanwhile,
    counted from the first recommendation (startup and the group join left out).

    Why not the topic's end offsets: the embedded broker answers ListOffsets with the base
    offset of a partition's last record batch, one batch per partition short (streams/lag.py).
    """
    deadline = time.monotonic() + timeout
    last, last_t = -1.0, time.monotonic()
    first: tuple[float, dict[str, float]] | None = None
    while True:
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.returncode}")
        with contextlib.suppress(OSError):  # the endpoint is up once the worker has started
            total = sum(
                worker_metrics(port).get("interest_recommendations_total", 0.0) for port in ports
            )
            if first is None and total > 0:
                first = (total, {name: cpu_seconds(pid) for name, pid in pids.items()})
            if total >= n:
                assert first is not None
                done = total - first[0] or 1.0
                return {
                    name: (cpu_seconds(pid) - first[1][name]) / done for name, pid in pids.items()
                }
            if total != last:
                last, last_t = total, time.monotonic()
                print(f"  worker: {total:,.0f}/{n:,} recommendations", flush=True)
        if time.monotonic() > deadline or time.monotonic() - last_t > 90:
            raise RuntimeError(f"worker made {last:,.0f}/{n:,} recommendations before the timeout")
        time.sleep(2)


async def backlog_rate(bootstrap: str, topic: str, n: int) -> tuple[float, float, int]:
    """Sustained events/s from the recommendation records' broker timestamps (first to last)."""
    consumer = _consumer(bootstrap, max_partition_fetch_bytes=4 * 1024 * 1024)
    await assign_all(consumer, topic)
    stamps: list[int] = []
    try:
        while len(stamps) < n:
            batches = await consumer.getmany(timeout_ms=2000, max_records=20_000)
            if not batches:
                break
            for records in batches.values():
                stamps.extend(r.timestamp for r in records)
    finally:
        await consumer.stop()
    stamps.sort()
    span = (stamps[-1] - stamps[0]) / 1000
    # Also the middle 80%: excludes the start (cold caches, join) and the tail.
    lo, hi = stamps[len(stamps) // 10], stamps[len(stamps) * 9 // 10]
    mid = (len(stamps) * 8 // 10) / max((hi - lo) / 1000, 1e-9)
    return (len(stamps) - 1) / span, mid, len(stamps)


async def latency(
    bootstrap: str,
    topic: str,
    out_topic: str,
    events: list[tuple[str, str, int]],
    rate: float,
    seconds: float,
    pids: dict[str, int],
) -> dict[str, Any]:
    """Produce at ``rate`` for ``seconds``; latency produce -> recommendation received.

    Also per half of the run (by send time): p50/p99 and the CPU microseconds per event of
    each of ``pids``. Why: the embedded broker's CPU per fetch grows with the number of record
    batches stored in the partition it reads (it lists them all to find the fetch offset),
    and this run stores one per partition per tick, so the second half can be slower for
    reasons that are the broker's, not the worker's."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner

    consumer = await tail_reader(bootstrap, out_topic)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
    await producer.start()
    partitions = sorted(await producer.partitions_for(topic))
    partitioner = DefaultPartitioner()  # what send() would choose for the key
    sent: dict[str, tuple[float, float]] = {}  # trigger id -> (perf_counter, wall clock)
    got: list[float] = []
    got_sent: list[float] = []  # send time of each of got
    # the same split at the payload's generated_at (wall clock, ms): produce -> the worker
    # made the payload (fetch, batching, apply, recommend), then -> received (publish,
    # the reader's fetch); both clocks are this machine's
    before_payload: list[float] = []
    after_payload: list[float] = []
    n_total = min(len(events), int(rate * seconds))
    stop = asyncio.Event()

    async def receive() -> None:
        while not (stop.is_set() and len(got) >= len(sent)):
            batches = await consumer.getmany(timeout_ms=200)
            now, wall = time.perf_counter(), time.time()
            for records in batches.values():
                for record in records:
                    payload = orjson.loads(record.value)
                    stamps = sent.get(payload.get("trigger_event_id"))
                    if stamps is not None:
                        got.append(now - stamps[0])
                        got_sent.append(stamps[0])
                        made = payload["generated_at"] / 1000
                        before_payload.append(made - stamps[1])
                        after_payload.append(wall - made)

    receiver = asyncio.create_task(receive())
    t0 = time.perf_counter()
    tick = 0.01
    i = 0
    cpu_marks = [(t0, 0, _cpu_of(pids))]
    while i < n_total:
        if len(cpu_marks) == 1 and i >= n_total // 2:
            cpu_marks.append((time.perf_counter(), i, _cpu_of(pids)))
        due = int((time.perf_counter() - t0) * rate) + 1
        # What is due, as one record batch per partition: the bench's own CPU shares the two
        # cores with what it measures, and a send() per event cost it more.
        stamp = (time.perf_counter(), time.time())
        outgoing: dict[int, Any] = {}  # partition -> its record batch
        while i < min(due, n_total):
            user, item, rank = events[i]
            key = user.encode()
            partition = partitioner(key, partitions, partitions)
            batch = outgoing.get(partition)
            if batch is None:
                batch = outgoing[partition] = producer.create_batch()
            value = event_bytes(user, item, rank, "lat")
            if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it
                await producer.send_batch(batch, topic, partition=partition)
                batch = outgoing[partition] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
            sent[f"lat-{user}-{rank}"] = stamp
            i += 1
        for partition, batch in outgoing.items():
            await producer.send_batch(batch, topic, partition=partition)
        await asyncio.sleep(tick)
    elapsed = time.perf_counter() - t0
    cpu_marks.append((time.perf_counter(), i, _cpu_of(pids)))
    await producer.flush()
    stop.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(receiver, 30)
    await producer.stop()
    await consumer.stop()
    ms = sorted(x * 1000 for x in got)
    q = percentiles(ms)
    halves = []
    for (start, first, cpu_start), (end, last, cpu_end) in itertools.pairwise(cpu_marks):
        pairs = zip(got, got_sent, strict=True)
        part = sorted(1000 * x for x, sent_at in pairs if start <= sent_at < end)
        cuts = percentiles(part)
        events = max(1, last - first)
        cpu = {n: round(1e6 * (cpu_end[n] - cpu_start[n]) / events) for n in pids}
        halves.append({"p50_ms": round(cuts[49], 1), "p99_ms": round(cuts[98], 1), "cpu_us": cpu})
    return {
        "halves": halves,
        "sent": n_total,
        "received": len(ms),
        "rate": n_total / elapsed,
        "p50_ms": q[49],
        "p99_ms": q[98],
        "max_ms": ms[-1] if ms else float("nan"),
        "to_payload_p50_p99_ms": percentiles([x * 1000 for x in before_payload])[49::49],
        "from_payload_p50_p99_ms": percentiles([x * 1000 for x in after_payload])[49::49],
    }


def percentiles(values: list[float]) -> list[float]:
    """The 99 cut points (index 49: p50, 98: p99); NaN where there are too few values."""
    return statistics.quantiles(values, n=100) if len(values) > 1 else [float("nan")] * 99


def worker_metrics(port: int) -> dict[str, float]:
    """Batch sums and counts, recommendations (all sources) and assigned partitions (per
    topic) from the worker's /metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in (
            "interest_batch_seconds_sum",
            "interest_batch_seconds_count",
            "interest_batch_size_sum",
        ) or name.startswith(
            (
                "interest_stage_seconds_sum{",
                "interest_stage_seconds_count{",
                "interest_assigned_partitions{",
            )
        ):
            out[name] = float(value)
        elif name.startswith("interest_recommendations_total{"):
            out["interest_recommendations_total"] = out.get(
                "interest_recommendations_total", 0.0
            ) + float(value)
    return out


def stage_means(now: dict[str, float], since: dict[str, float] | None = None) -> dict[str, float]:
    """Mean ms per batch of each stage (``interest_stage_seconds``), over what happened after
    ``since`` (another reading of the same worker's metrics)."""
    from streams.metrics import STAGES

    out = {}
    for stage in STAGES:
        total, count = (f'interest_stage_seconds_{x}{{stage="{stage}"}}' for x in ("sum", "count"))
        n = now.get(count, 0.0) - (since or {}).get(count, 0.0)
        if n:
            out[stage] = 1000 * (now[total] - (since or {}).get(total, 0.0)) / n
    return out


def format_stages(stages: dict[str, float]) -> str:
    return ", ".join(f"{stage} {ms:,.1f}" for stage, ms in stages.items())


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports (worker i of a supervisor serves on base + i)."""
    from streams.stack import free_port

    def free(port: int) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) != 0

    while True:
        base = free_port()
        if base + n < 65536 and all(free(base + i) for i in range(1, n)):
            return base


def scale_out(
    counts: list[int],
    partitions: int,
    backlog: list[tuple[str, str, int]],
    bundle: Path | None,
    workdir: Path,
) -> None:
    """(d) events/s from a backlog for each process count, on one stack (see the docstring);
    ``bundle`` None runs the popularity baseline."""
    from streams.stack import start_stack, stop_stack

    home = Path(tempfile.mkdtemp(prefix="interest-bench-home-"))
    rows = []
    try:
        info = start_stack(home)
        print(f"stack: {info.bootstrap_servers} {info.redis_url}; bundle {bundle}", flush=True)
        for count in counts:
            rows.append(scale_point(info, home, count, partitions, backlog, bundle, workdir))
    finally:
        stop_stack(home)
        shutil.rmtree(home, ignore_errors=True)
    print(
        f"\n(d) {len(backlog):,} events, {partitions} partitions, {os.cpu_count()} cores\n"
        "processes | events/s first->last | middle 80% | x first row | CPU us/event"
        " worker / redis / broker | partitions per process"
    )
    for row in rows:
        cpu = row["cpu_us_per_event"]
        print(
            f"{row['processes']} | {row['eps']:,} | {row['eps_middle80']:,}"
            f" | {row['eps'] / rows[0]['eps']:.2f} | {cpu['worker']} / {cpu['redis']} /"
            f" {cpu['broker']} | {'/'.join(map(str, row['split']))}",
            flush=True,
        )
    print("SUMMARY " + json.dumps({"events": len(backlog), "partitions": partitions, "rows": rows}))


def scale_point(
    info: StackInfo,
    home: Path,
    count: int,
    partitions: int,
    backlog: list[tuple[str, str, int]],
    bundle: Path | None,
    workdir: Path,
) -> dict[str, Any]:
    """`interest worker --processes count` over the backlog on fresh topics, group and keys."""
    from streams.settings import Settings
    from streams.stack import stop_process
    from streams.topics import ensure_topics

    tag = f"p{count}{uuid.uuid4().hex[:6]}"
    base = free_ports(count)
    env = {
        **stack_env(home, tag, base, bundle or Path()),
        "INTEREST_TOPIC_PARTITIONS": str(partitions),
    }
    os.environ.update(env)  # for Settings() here and the worker
    if bundle is None:  # the popularity baseline
        del os.environ["INTEREST_MODEL"]
    settings = Settings()
    ensure_topics(settings)
    n = len(backlog)
    secs = asyncio.run(produce(info.bootstrap_servers, settings.topic_clicks, backlog, tag))
    print(f"(d) {count} process(es): produced {n:,} events in {secs:.1f}s", flush=True)
    ports = [base + i for i in range(count)]
    log_path = workdir / f"worker-p{count}.log"
    worker = start_worker(dict(os.environ), log_path, processes=count)
    try:
        pids = {"worker": worker.pid, "redis": info.redis_pid, "broker": info.broker_pid}
        cpu = wait_recommended(ports, n, timeout=max(600, n / 500), worker=worker, pids=pids)
        split = [
            int(
                worker_metrics(port).get(
                    f'interest_assigned_partitions{{topic="{settings.topic_clicks}"}}', 0
                )
            )
            for port in ports
        ]
    finally:
        stop_process(worker)
    rate, rate_mid, n_recs = asyncio.run(
        backlog_rate(info.bootstrap_servers, settings.topic_recommendations, n)
    )
    print(
        f"(d) {count} process(es): {rate:,.0f} events/s first->last over {n_recs:,}"
        f" recommendations (middle 80%: {rate_mid:,.0f}/s); partitions per process {split}",
        flush=True,
    )
    return {
        "processes": count,
        "eps": round(rate),
        "eps_middle80": round(rate_mid),
        "recommendations": n_recs,
        "split": split,
        "cpu_us_per_event": {name: round(1e6 * sec) for name, sec in cpu.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=150_000, help="backlog size for (a) and (c)")
    ap.add_argument("--naive-events", type=int, default=2000)
    ap.add_argument("--latency-seconds", type=float, default=25.0)
    ap.add_argument(
        "--latency-rate",
        type=float,
        default=None,
        help="events/s for the latency run (default: half the sustained rate just measured)",
    )
    ap.add_argument("--model", type=Path, default=None, help="bundle (default: cached/exported)")
    ap.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "interest-bench-stream"
    )
    ap.add_argument("--keep-worker-log", action="store_true")
    ap.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=None,
        help="(d) only: backlog events/s of `interest worker --processes P` for each P",
    )
    ap.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="(d): input partitions (default: the least common multiple of --processes)",
    )
    ap.add_argument(
        "--worker-without-model",
        action="store_true",
        help="(c) without INTEREST_MODEL (the popularity baseline): what the rest of the "
        "worker's path allows, without the encoder",
    )
    # imported here, not above: stream_curve imports this module
    import stream_curve

    stream_curve.add_arguments(ap)
    args = ap.parse_args()
    if args.curve and args.processes:
        ap.error("--curve and --processes are separate runs")
    if not DATA.is_file():
        print(f"skipped: {DATA} not found (the data sets are not committed)")
        return

    from streams.settings import Settings
    from streams.stack import free_port, start_stack, stop_process, stop_stack
    from streams.topics import ensure_topics

    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = find_bundle(args.workdir, args.model)
    if args.curve:
        stream_curve.run(args, bundle)
        return
    if args.processes:
        if min(args.processes) < 1:
            ap.error("--processes takes counts of at least 1")
        partitions = args.partitions or math.lcm(*args.processes)
        model = None if args.worker_without_model else bundle
        scale_out(args.processes, partitions, load_events(DATA, args.events), model, args.workdir)
        return
    n_lat_max = int(args.latency_seconds * 20_000)
    events = load_events(DATA, args.events + n_lat_max)
    backlog, later = events[: args.events], events[args.events :]
    # This process times the latency run: a full collection over what is loaded by now
    # (the events; torch, if it exported) would pause it inside the timed run.
    gc.collect()
    gc.freeze()
    n = len(backlog)
    home = Path(tempfile.mkdtemp(prefix="interest-bench-home-"))
    worker = None
    log_path = args.workdir / "worker.log"
    try:
        info = start_stack(home)
        tag = f"b{uuid.uuid4().hex[:6]}"
        metrics_port = free_port()
        env = stack_env(home, tag, metrics_port, bundle)
        os.environ.update(env)
        settings = Settings()
        ensure_topics(settings)
        naive_topic = f"{tag}.naive"
        ensure_topics(Settings(topic_recommendations=naive_topic))
        clicks, recs = settings.topic_clicks, settings.topic_recommendations
        bootstrap = info.bootstrap_servers
        print(f"stack: {bootstrap} {info.redis_url}; bundle {bundle}; {n:,} events", flush=True)
        secs = asyncio.run(produce(bootstrap, clicks, backlog, "ml1m"))
        print(f"produced {n:,} events in {secs:.1f}s ({n / secs:,.0f}/s)", flush=True)

        ceiling = asyncio.run(bench_ceiling(bootstrap, clicks, n))
        print(f"(a) ceiling: aiokafka consume + json.loads: {ceiling:,.0f} events/s", flush=True)

        naive = asyncio.run(
            bench_naive(
                bootstrap,
                info.redis_url,
                clicks,
                naive_topic,
                bundle,
                args.naive_events,
                settings.top_k,
            )
        )
        print(
            f"(b) naive (per-event Redis GET/SET, full recompute, awaited send): "
            f"{naive:,.0f} events/s over {args.naive_events:,} events",
            flush=True,
        )

        worker_env = {**os.environ, **env}
        if args.worker_without_model:
            del worker_env["INTEREST_MODEL"]
            print("(c) runs without INTEREST_MODEL: the popularity baseline", flush=True)
        worker = start_worker(worker_env, log_path)
        print(
            f"(c) worker pid {worker.pid} started (log {log_path}); draining the backlog",
            flush=True,
        )
        pids = {"worker": worker.pid, "redis": info.redis_pid, "broker": info.broker_pid}
        cpu = wait_recommended(
            [metrics_port], n, timeout=max(600, n / 500), worker=worker, pids=pids
        )
        rate, rate_mid, n_recs = asyncio.run(backlog_rate(bootstrap, recs, n))
        print(
            f"(c) worker sustained: {rate:,.0f} events/s first->last over {n_recs:,} "
            f"recommendations (middle 80%: {rate_mid:,.0f}/s)",
            flush=True,
        )
        bm = worker_metrics(metrics_port)
        n_batches = bm.get("interest_batch_seconds_count", 0) or 1
        busy = bm.get("interest_batch_seconds_sum", 0.0)
        print(
            f"    {n_batches:,.0f} batches, mean"
            f" {bm.get('interest_batch_size_sum', 0) / n_batches:,.0f} events, mean"
            f" {1000 * busy / n_batches:,.1f} ms in a batch's stages;"
            f" {busy:,.1f} s summed over the {n_recs / rate:,.1f} s span"
            " (batches in flight overlap)",
            flush=True,
        )
        print(
            "    CPU us per event: "
            + ", ".join(f"{name} {1e6 * sec:,.0f}" for name, sec in cpu.items())
            + f" (each with its child processes); {os.cpu_count()} cores",
            flush=True,
        )
        stages = stage_means(bm)
        if stages:
            # Each kind of stage runs one batch at a time: the slowest bounds batches/s, and
            # so does recommend + finish (they share the inference thread).
            print(f"    mean ms per batch by stage: {format_stages(stages)}", flush=True)
        lat_rate = args.latency_rate or rate / 2
        lat_pids = {**pids, "bench": os.getpid()}
        lat = asyncio.run(
            latency(bootstrap, clicks, recs, later, lat_rate, args.latency_seconds, lat_pids)
        )
        print(
            f"(c) latency at {lat['rate']:,.0f} events/s for {args.latency_seconds:.0f}s: "
            f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms "
            f"({lat['received']:,}/{lat['sent']:,} received)",
            flush=True,
        )
        to_payload, from_payload = lat["to_payload_p50_p99_ms"], lat["from_payload_p50_p99_ms"]
        print(
            f"    produced -> payload made (fetch, batching, apply, recommend): p50"
            f" {to_payload[0]:.1f} ms, p99 {to_payload[1]:.1f} ms; -> received (publish, the"
            f" reader's fetch): p50 {from_payload[0]:.1f} ms, p99 {from_payload[1]:.1f} ms",
            flush=True,
        )
        for name, half in zip(("first", "second"), lat["halves"], strict=False):
            cpu_line = ", ".join(f"{n} {us:,}" for n, us in half["cpu_us"].items())
            print(
                f"    {name} half: p50 {half['p50_ms']:.1f} ms, p99 {half['p99_ms']:.1f} ms;"
                f" CPU us per event: {cpu_line}",
                flush=True,
            )
        after = worker_metrics(metrics_port)
        lat_stages = stage_means(after, since=bm)
        batches = after.get("interest_batch_seconds_count", 0.0) - bm.get(
            "interest_batch_seconds_count", 0.0
        )
        if lat_stages:
            print(
                f"    {batches:,.0f} batches of {lat['sent'] / max(batches, 1):,.0f} events on"
                f" average; mean ms by stage: {format_stages(lat_stages)}",
                flush=True,
            )
        summary = {
            "events": n,
            "ceiling_eps": round(ceiling),
            "naive_eps": round(naive, 1),
            "worker_eps": round(rate),
            "worker_eps_middle80": round(rate_mid),
            "latency_rate_eps": round(lat["rate"]),
            "latency_p50_ms": round(lat["p50_ms"], 1),
            "latency_p99_ms": round(lat["p99_ms"], 1),
            "latency_to_payload_p50_p99_ms": [round(x, 1) for x in lat["to_payload_p50_p99_ms"]],
            "latency_from_payload_p50_p99_ms": [
                round(x, 1) for x in lat["from_payload_p50_p99_ms"]
            ],
            "latency_halves": lat["halves"],
            "latency_received": lat["received"],
            "latency_sent": lat["sent"],
            "worker_over_naive": round(rate / naive, 1),
            "worker_over_ceiling": round(rate / ceiling, 3),
            "stage_ms": {stage: round(ms, 1) for stage, ms in stages.items()},
            "latency_stage_ms": {stage: round(ms, 1) for stage, ms in lat_stages.items()},
            "cpu_us_per_event": {name: round(1e6 * sec) for name, sec in cpu.items()},
        }
        print(f"ratios: c/b = {rate / naive:,.1f}x, c/a = {rate / ceiling:.2f}")
        print("SUMMARY " + json.dumps(summary), flush=True)
    finally:
        if worker is not None:
            stop_process(worker)
        stop_stack(home)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
