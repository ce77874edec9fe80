"""`bench/stream.py --curve`: the worker's latency against the load, the worker on a core of
its own.

1. The sustained rate: `interest worker` drains a backlog of ``--events`` on a fresh stack
   (the events/s of part (c), first to last recommendation), once per tree.
2. For each fraction of this checkout's sustained rate (``--curve-points``), and each tree in
   turn: a fresh stack (the embedded broker slows as record batches pile up in a partition,
   so no point inherits another's), a fresh worker primed with a small backlog (so the group
   join and the first inferences are over), then events paced evenly at the target rate:
   ``--warmup-seconds`` not counted, ``--point-seconds`` measured, and a short tail that keeps
   the load on while the last measured events are served.

Pinning: the worker (every thread) on ``--worker-core``; this process, and with it the broker
and Redis it starts, on ``--harness-core``, so that the load generator, the reader and the
stack never take the worker's CPU. What was applied is read back from /proc and printed.

Two latencies per event: the worker's part, ``generated_at - received_at`` of the
recommendation payload (``received_at`` is the input record's timestamp, which the generator
sets to its own clock as it produces; the run counts how many records kept it), and end to
end, produce to received by a reader whose fetch wait is short (the embedded broker holds a
fetch for its whole wait even when data arrives).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import stream
from latency_curve import (
    DEFAULT_FRACTIONS,
    Phases,
    PointResult,
    allowed_cpus,
    choose_cores,
    events_due,
    format_cpus,
    format_table,
    parse_cpus,
    phases,
    pin,
    plot,
    rate_points,
    summary,
    write_json,
)

READER_FETCH_WAIT_MS = 5
PRIME_EVENTS = 1000
TAIL_SECONDS = 1.0
# after the last send, how long the measured events' recommendations may take to arrive
DRAIN_SECONDS = 60.0

Cores = tuple[frozenset[int], frozenset[int]] | None


@dataclass(frozen=True)
class Tree:
    """A source tree whose `interest worker` is measured, and the bundle it loads."""

    label: str
    path: Path
    model: Path | None  # None: the popularity baseline (--worker-without-model)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    group = ap.add_argument_group("latency curve (--curve)")
    group.add_argument(
        "--curve",
        action="store_true",
        help="instead of (a)-(c): the sustained rate, then worker-side and end-to-end latency"
        " at --curve-points of it, the worker pinned to a core of its own",
    )
    group.add_argument(
        "--curve-points", type=float, nargs="+", default=list(DEFAULT_FRACTIONS), metavar="F"
    )
    group.add_argument("--point-seconds", type=float, default=30.0)
    group.add_argument("--warmup-seconds", type=float, default=5.0)
    group.add_argument(
        "--tick-ms",
        type=float,
        default=10.0,
        help="the load generator sends what is due every tick, one record batch per partition",
    )
    group.add_argument(
        "--curve-rate",
        type=float,
        default=None,
        help="take this as 100%% (events/s) and skip the backlog runs",
    )
    group.add_argument("--worker-core", type=parse_cpus, default=None, metavar="CPUS")
    group.add_argument("--harness-core", type=parse_cpus, default=None, metavar="CPUS")
    group.add_argument(
        "--compare-tree",
        type=Path,
        default=None,
        help="another checkout (e.g. `git worktree add /tmp/base main`): each run alternates"
        " between it and this one, on fresh stacks",
    )
    group.add_argument(
        "--compare-model", type=Path, default=None, help="its bundle (default: --model's)"
    )
    group.add_argument("--json", type=Path, default=None, help="write every number here")
    group.add_argument(
        "--plot", type=Path, default=Path(__file__).resolve().parent / "latency_curve.png"
    )


def run(args: argparse.Namespace, bundle: Path) -> None:
    """The curve, as the options ask (the module docstring says how)."""
    try:
        rate_points(1.0, args.curve_points)  # before minutes of backlog, not after
    except ValueError as exc:
        raise SystemExit(f"--curve-points: {exc}") from None
    cores = pin_harness(args.worker_core, args.harness_core)
    model = None if args.worker_without_model else bundle
    trees = [Tree(tree_label(stream.REPO_ROOT), stream.REPO_ROOT, model)]
    if args.compare_tree is not None:
        other = args.compare_tree.resolve()
        trees.append(Tree(tree_label(other), other, model and (args.compare_model or bundle)))
    for tree in trees:
        print(f"tree {tree.label}: {tree.path}; worker imports {worker_imports(tree)}", flush=True)

    events = stream.load_events(stream.DATA, sys.maxsize)
    gc.collect()
    gc.freeze()  # a full collection over the loaded events would pause the generator
    sustained = []
    if args.curve_rate is None:
        for tree in trees:
            sustained.append(measure_sustained(tree, events[: args.events], cores, args.workdir))
        reference = sustained[0]["eps"]
    else:
        reference = args.curve_rate
    points = rate_points(reference, args.curve_points)
    ph_max = phases(
        max(r for _, r in points), args.warmup_seconds, args.point_seconds, TAIL_SECONDS
    )
    if PRIME_EVENTS + ph_max.total > len(events):
        raise SystemExit(
            f"the fastest point needs {PRIME_EVENTS + ph_max.total:,} events and"
            f" {stream.DATA.name} has {len(events):,}: shorten --point-seconds"
        )
    results = []
    for k, (fraction, rate) in enumerate(points):
        # the trees' order flips at each point, so neither always meets the machine first
        for tree in trees if k % 2 == 0 else trees[::-1]:
            results.append(run_point(tree, fraction, rate, events, args, cores))
    results.sort(key=lambda r: (r.fraction, [t.label for t in trees].index(r.tree)))
    report(args, trees, sustained, reference, cores, results)


def pin_harness(worker: frozenset[int] | None, harness: frozenset[int] | None) -> Cores:
    """This process onto the harness's cores, before it starts any stack (they inherit it);
    returns the worker's cores and the harness's, or None where nothing is pinned."""
    available = frozenset(os.sched_getaffinity(0))
    try:
        cores = choose_cores(available, worker, harness)
    except ValueError as exc:
        raise SystemExit(f"--worker-core/--harness-core: {exc}") from None
    if cores is None:
        print(f"pinning: none ({len(available)} core available)", flush=True)
        return None
    pin(os.getpid(), cores[1])
    print(
        f"pinning: worker on CPU {format_cpus(cores[0])}; broker, Redis, load generator"
        f" and reader on CPU {format_cpus(cores[1])} (of {format_cpus(available)})",
        flush=True,
    )
    return cores


def report(
    args: argparse.Namespace,
    trees: list[Tree],
    sustained: list[dict[str, Any]],
    reference: float,
    cores: Cores,
    results: list[PointResult],
) -> None:
    by = "--curve-rate" if args.curve_rate is not None else f"{trees[0].label}'s sustained rate"
    print(f"\nlatency curve: 100% = {reference:,.0f} events/s ({by})")
    for tree, row in zip(trees, sustained, strict=False):
        print(
            f"  {tree.label} sustained from a backlog of {args.events:,}: {row['eps']:,} events/s"
            f" (middle 80%: {row['eps_middle80']:,}), worker CPU {cpu_text(row['worker_cpu_us'])}"
        )
    print(format_table(results), flush=True)
    method = {
        "utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "worker_cpus": format_cpus(cores[0]) if cores else None,
        "harness_cpus": format_cpus(cores[1]) if cores else None,
        "reference_eps": round(reference),
        "reference": by,
        "fractions": args.curve_points,
        "point_seconds": args.point_seconds,
        "warmup_seconds": args.warmup_seconds,
        "tail_seconds": TAIL_SECONDS,
        "tick_ms": args.tick_ms,
        "prime_events": PRIME_EVENTS,
        "backlog_events": args.events,
        "reader_fetch_max_wait_ms": READER_FETCH_WAIT_MS,
        "data": str(stream.DATA),
        "worker_without_model": args.worker_without_model,
    }
    tree_rows = [
        {"label": t.label, "path": str(t.path), "model": str(t.model), **row}
        for t, row in zip(trees, sustained or [{}] * len(trees), strict=True)
    ]
    if args.json is not None:
        write_json(args.json, method, tree_rows, results)
        print(f"wrote {args.json}")
    pinned = f"worker on CPU {method['worker_cpus']}" if cores else "not pinned"
    title = f"latency against rate; {pinned}; 100% = {reference:,.0f} events/s ({by})"
    if plot(args.plot, results, title):
        print(f"wrote {args.plot}")
    else:
        print("no plot: matplotlib is not installed (pip install -e '.[train]')")


def cpu_text(us: int | None) -> str:
    return f"{us:,} us/event" if us else "n/a (the backlog drained too fast to time: more --events)"


def tree_label(path: Path) -> str:
    """The tree's commit, marked when its files differ from it."""
    done = subprocess.run(
        ["git", "-C", str(path), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or path.name


def worker_env(tree: Path, base: dict[str, str]) -> dict[str, str]:
    """This environment with ``base`` over it, which makes a child Python import the packages
    of ``tree``; a ``base`` without INTEREST_MODEL runs the popularity baseline, whatever the
    shell exports."""
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **base, "PYTHONPATH": path}
    if "INTEREST_MODEL" not in base:
        env.pop("INTEREST_MODEL", None)
    return env


def worker_imports(tree: Tree) -> str:
    """Where the worker of ``tree`` will import `streams` from: proof the trees differ."""
    done = subprocess.run(
        [sys.executable, "-c", "import streams; print(streams.__file__)"],
        env=worker_env(tree.path, {}),
        cwd=tree.path,
        capture_output=True,
        text=True,
        check=True,
    )
    return str(Path(done.stdout.strip()).parent)


@contextlib.contextmanager
def fresh_stack() -> Iterator[tuple[Path, Any]]:
    """An embedded broker and Redis in a temporary home, stopped and removed after."""
    from streams.stack import start_stack, stop_stack

    home = Path(tempfile.mkdtemp(prefix="interest-curve-home-"))
    try:
        yield home, start_stack(home)
    finally:
        stop_stack(home)
        shutil.rmtree(home, ignore_errors=True)


def worker_topics(tree: Tree, home: Path) -> tuple[dict[str, str], int, Any]:
    """A worker's settings on the stack in ``home`` (topics, group and keys of its own), its
    topics made; returns its environment, metrics port and settings."""
    from streams.settings import Settings
    from streams.stack import free_port
    from streams.topics import ensure_topics

    port = free_port()
    env = stream.stack_env(home, f"c{uuid.uuid4().hex[:6]}", port, tree.model or Path())
    if tree.model is None:
        del env["INTEREST_MODEL"]
    with mock.patch.dict(os.environ, env):  # Settings() reads them; the next point has its own
        settings = Settings()
        ensure_topics(settings)
    return env, port, settings


@contextlib.contextmanager
def pinned_worker(
    tree: Tree, env: dict[str, str], cores: Cores, log_path: Path
) -> Iterator[subprocess.Popen]:
    """`interest worker` of ``tree``, pinned to the worker's cores before it starts a thread
    (the threads it starts inherit the mask), stopped after."""
    from streams.stack import stop_process

    worker = stream.start_worker(worker_env(tree.path, env), log_path, tree=tree.path)
    if cores is not None:
        pin(worker.pid, cores[0])
    try:
        yield worker
    except RuntimeError as exc:  # wait_recommended's: the worker exited or stalled
        raise RuntimeError(f"{exc}; its log: {log_path}") from exc
    finally:
        stop_process(worker)


def affinity_of(pids: dict[str, int]) -> dict[str, str]:
    """The CPUs each process's threads may run on, read back, with its thread count."""
    out = {}
    for name, pid in pids.items():
        cpus, threads = allowed_cpus(pid)
        out[name] = f"CPU {format_cpus(cpus)}, threads {threads}"
    return out


def measure_sustained(
    tree: Tree, backlog: list[tuple[str, str, int]], cores: Cores, workdir: Path
) -> dict[str, Any]:
    """Events/s the pinned worker of ``tree`` sustains over ``backlog``, on a fresh stack."""
    n = len(backlog)
    with fresh_stack() as (home, info):
        env, port, settings = worker_topics(tree, home)
        # the whole backlog first: the worker must never wait for the producer
        asyncio.run(stream.produce(info.bootstrap_servers, settings.topic_clicks, backlog, "b"))
        with pinned_worker(tree, env, cores, workdir / "worker-curve-backlog.log") as worker:
            cpu = stream.wait_recommended(
                [port], n, timeout=max(600, n / 500), worker=worker, pids={"worker": worker.pid}
            )
            affinity = affinity_of({"worker": worker.pid, "broker": info.broker_pid})
        rate, rate_mid, n_recs = asyncio.run(
            stream.backlog_rate(info.bootstrap_servers, settings.topic_recommendations, n)
        )
    # zero where the backlog drained between two of wait_recommended's polls: no window
    worker_cpu_us = round(1e6 * cpu["worker"]) or None
    row = {
        "eps": round(rate),
        "eps_middle80": round(rate_mid),
        "recommendations": n_recs,
        "worker_cpu_us": worker_cpu_us,
        "affinity": affinity,
    }
    print(
        f"sustained, {tree.label}: {row['eps']:,} events/s over {n_recs:,} recommendations"
        f" (middle 80%: {row['eps_middle80']:,}); worker CPU {cpu_text(worker_cpu_us)};"
        f" affinity {affinity}",
        flush=True,
    )
    return row


def run_point(
    tree: Tree,
    fraction: float,
    rate: float,
    events: list[tuple[str, str, int]],
    args: argparse.Namespace,
    cores: Cores,
) -> PointResult:
    """One rate point of one tree on a fresh stack and worker (the module docstring)."""
    ph = phases(rate, args.warmup_seconds, args.point_seconds, TAIL_SECONDS)
    prime, paced = events[:PRIME_EVENTS], events[PRIME_EVENTS : PRIME_EVENTS + ph.total]
    print(f"point {tree.label} {100 * fraction:g}% ({rate:,.0f}/s)", flush=True)
    gc.collect()
    with fresh_stack() as (home, info):
        bootstrap = info.bootstrap_servers
        env, port, settings = worker_topics(tree, home)
        asyncio.run(stream.produce(bootstrap, settings.topic_clicks, prime, "prime"))
        log = args.workdir / "worker-curve-point.log"
        with pinned_worker(tree, env, cores, log) as worker:
            stream.wait_recommended([port], len(prime), timeout=300, worker=worker, pids={})
            pids = {
                "worker": worker.pid,
                "broker": info.broker_pid,
                "redis": info.redis_pid,
                "bench": os.getpid(),
            }
            run = asyncio.run(
                paced_run(
                    bootstrap,
                    (settings.topic_clicks, settings.topic_recommendations),
                    paced,
                    rate,
                    ph,
                    args.tick_ms / 1000,
                    port,
                    pids,
                )
            )
            affinity = affinity_of(pids)
    result = point_result(tree.label, fraction, rate, ph, run, affinity)
    print(
        f"  achieved {result.achieved_eps:,.0f}/s; worker p50/p99/max"
        f" {result.worker_ms['p50']:.1f}/{result.worker_ms['p99']:.1f}/"
        f"{result.worker_ms['max']:.1f} ms; e2e {result.e2e_ms['p50']:.1f}/"
        f"{result.e2e_ms['p99']:.1f}/{result.e2e_ms['max']:.1f} ms; worker CPU"
        f" {result.worker_cpu_us_per_event:,.0f} us/event; received"
        f" {result.received:,}/{result.sent:,}; record timestamps kept"
        f" {result.timestamps_kept:,}/{result.received:,}; affinity {affinity}",
        flush=True,
    )
    return result


def point_result(
    label: str,
    fraction: float,
    rate: float,
    ph: Phases,
    run: dict[str, Any],
    affinity: dict[str, str],
) -> PointResult:
    start, end = run["marks"]
    seconds = max(end["t"] - start["t"], 1e-9)
    processed = max(end["recommendations"] - start["recommendations"], 1.0)
    cpu = {name: end["cpu"][name] - start["cpu"][name] for name in start["cpu"]}
    harness = sum(sec for name, sec in cpu.items() if name != "worker")
    return PointResult(
        tree=label,
        fraction=fraction,
        target_eps=rate,
        achieved_eps=(ph.end - ph.start) / seconds,
        worker_ms=summary(run["worker_ms"]),
        e2e_ms=summary(run["e2e_ms"]),
        worker_cpu_us_per_event=1e6 * cpu["worker"] / processed,
        sent=ph.end - ph.start,
        received=len(run["e2e_ms"]),
        worker_core_load=cpu["worker"] / seconds,
        harness_core_load=harness / seconds,
        timestamps_kept=run["kept"],
        affinity=affinity,
    )


def mark(t: float, port: int, pids: dict[str, int]) -> dict[str, Any]:
    """The clock ``t``, each process's CPU seconds and the worker's recommendations so far
    (read in a thread, so the generator does not wait for /proc and the metrics endpoint)."""
    cpu = {name: stream.cpu_seconds(pid, children=pid != os.getpid()) for name, pid in pids.items()}
    recs = stream.worker_metrics(port).get("interest_recommendations_total", 0.0)
    return {"t": t, "cpu": cpu, "recommendations": recs}


async def paced_run(
    bootstrap: str,
    topics: tuple[str, str],
    events: list[tuple[str, str, int]],
    rate: float,
    ph: Phases,
    tick: float,
    port: int,
    pids: dict[str, int],
) -> dict[str, Any]:
    """Produce ``events`` evenly at ``rate`` and read the recommendations of the measured ones.

    Each tick sends what is due as one record batch per partition, every record stamped with
    the generator's clock (epoch ms) as its timestamp: that is when it was produced."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner

    topic, out_topic = topics
    reader = await stream.tail_reader(bootstrap, out_topic, fetch_max_wait_ms=READER_FETCH_WAIT_MS)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
    await producer.start()
    partitions = sorted(await producer.partitions_for(topic))
    partitioner = DefaultPartitioner()  # what send() would choose for the key
    pending: dict[str, int] = {}  # measured trigger id -> its produce stamp, until received
    samples: dict[str, Any] = {"worker_ms": [], "e2e_ms": [], "kept": 0}
    all_received = asyncio.Event()

    async def receive() -> None:
        measured = ph.end - ph.start
        while True:
            batches = await reader.getmany(timeout_ms=100)
            now_ms = time.time() * 1000
            for records in batches.values():
                for record in records:
                    payload = orjson.loads(record.value)
                    stamp = pending.pop(payload.get("trigger_event_id"), None)
                    if stamp is None:
                        continue
                    samples["e2e_ms"].append(now_ms - stamp)
                    received_at = payload.get("received_at")
                    if received_at is not None:
                        samples["worker_ms"].append(payload["generated_at"] - received_at)
                        samples["kept"] += abs(received_at - stamp) <= 1
            if len(samples["e2e_ms"]) >= measured:
                all_received.set()

    receiver = asyncio.create_task(receive())
    marks: list[asyncio.Task] = []
    t0 = time.perf_counter()
    i = 0
    try:
        while i < ph.total:
            due = events_due(time.perf_counter() - t0, rate, ph.total)
            for edge in (ph.start, ph.end):  # the measured window opens or closes
                if i <= edge < due:
                    now = time.perf_counter()
                    marks.append(asyncio.create_task(asyncio.to_thread(mark, now, port, pids)))
            stamp = int(time.time() * 1000)
            outgoing: dict[int, Any] = {}  # partition -> its record batch
            for index in range(i, due):
                user, item, rank = events[index]
                key = user.encode()
                partition = partitioner(key, partitions, partitions)
                batch = outgoing.get(partition)
                if batch is None:
                    batch = outgoing[partition] = producer.create_batch()
                value = stream.event_bytes(user, item, rank, "c")
                if batch.append(key=key, value=value, timestamp=stamp) is None:  # full
                    await producer.send_batch(batch, topic, partition=partition)
                    batch = outgoing[partition] = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=stamp)
                if ph.start <= index < ph.end:
                    pending[f"c-{user}-{rank}"] = stamp
            for partition, batch in outgoing.items():
                await producer.send_batch(batch, topic, partition=partition)
            i = due
            await asyncio.sleep(tick)
        await producer.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_received.wait(), DRAIN_SECONDS)
        run_marks = [await m for m in marks]
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
        await producer.stop()
        await reader.stop()
    return {**samples, "marks": run_marks}
