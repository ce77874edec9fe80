"""What a latency curve is: its rate points, the load generator's schedule, the summary of a
point's latencies, the cores each side runs on, and the table, JSON and PNG it ends in.

Kept free of Kafka and of the stack so that its logic is tested without them
(tests/test_bench_latency.py); `bench/stream_curve.py` runs the curve with it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9)
BAR_MS = 100.0


def parse_cpus(text: str) -> frozenset[int]:
    """A CPU list as `taskset -c` takes it ("0", "1,3", "0-2,5") as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not (lo.isdigit() and (not sep or hi.isdigit())):
            raise ValueError(f"not a CPU list: {text!r} (e.g. 0, 1,3 or 0-2)")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"not a CPU list: {text!r} ({part} runs backwards)")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError(f"not a CPU list: {text!r}")
    return frozenset(cpus)


def format_cpus(cpus: Iterable[int]) -> str:
    """The inverse of ``parse_cpus``, ranges folded: {0, 1, 2, 5} -> "0-2,5"."""
    runs: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def choose_cores(
    available: frozenset[int],
    worker: frozenset[int] | None = None,
    harness: frozenset[int] | None = None,
) -> tuple[frozenset[int], frozenset[int]] | None:
    """The worker's cores and the harness's (broker, Redis, load generator, reader).

    By default the lowest available core for the worker and the next for the harness, so that
    the harness never takes the worker's CPU; None (nothing pinned) on a single core, where
    there is nothing to separate. Asked-for cores must be available and must not overlap."""
    if worker is None and harness is None and len(available) < 2:
        return None
    ordered = sorted(available)
    worker = worker if worker is not None else frozenset(ordered[:1])
    rest = [cpu for cpu in ordered if cpu not in worker]
    if harness is None:
        if not rest:
            raise ValueError(f"no core left for the harness beside the worker's {sorted(worker)}")
        harness = frozenset(rest[:1])
    for name, cpus in (("worker", worker), ("harness", harness)):
        if not cpus <= available:
            raise ValueError(
                f"{name} cores {format_cpus(cpus)} are not all available"
                f" (this process may run on {format_cpus(available)})"
            )
    if worker & harness:
        raise ValueError(
            f"the worker's cores {format_cpus(worker)} and the harness's"
            f" {format_cpus(harness)} overlap"
        )
    return worker, harness


def thread_ids(pid: int) -> list[int]:
    """The process's threads (each has an affinity of its own)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def pin(pid: int, cpus: frozenset[int]) -> None:
    """Every thread of ``pid`` onto ``cpus``; threads it starts later inherit it."""
    for tid in thread_ids(pid):
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue


def allowed_cpus(pid: int) -> tuple[frozenset[int], int]:
    """The CPUs any thread of ``pid`` may run on (their union) and how many threads it has:
    what was applied, read back, including threads a library started with its own mask."""
    cpus: set[int] = set()
    tids = thread_ids(pid)
    for tid in tids:
        try:
            cpus |= os.sched_getaffinity(tid)
        except OSError:
            continue
    return frozenset(cpus), len(tids)


def rate_points(reference: float, fractions: Sequence[float]) -> list[tuple[float, float]]:
    """(fraction, events/s) for each fraction of the reference (sustained) rate."""
    if reference <= 0:
        raise ValueError(f"the reference rate must be positive, not {reference}")
    bad = [f for f in fractions if not f > 0]  # NaN too
    if bad:
        raise ValueError(f"rate fractions must be positive: {bad}")
    return [(f, f * reference) for f in fractions]


@dataclass(frozen=True)
class Phases:
    """Event indices of one point's paced run: [0, start) warm-up, [start, end) measured,
    [end, total) a tail that keeps the load on while the last measured events are served."""

    start: int
    end: int
    total: int


def phases(rate: float, warmup_s: float, point_s: float, tail_s: float) -> Phases:
    start = math.ceil(rate * warmup_s)
    end = start + max(1, math.ceil(rate * point_s))
    return Phases(start, end, end + math.ceil(rate * tail_s))


def events_due(elapsed_s: float, rate: float, total: int) -> int:
    """How many events the generator should have sent ``elapsed_s`` into the run: event i is
    due at i / rate, so the load is even whatever the tick at which the generator wakes."""
    if elapsed_s < 0:
        return 0
    return min(total, math.floor(elapsed_s * rate) + 1)


def summary(values_ms: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max (NaN without values). The inclusive method: a percentile never lies
    beyond the largest value seen, however few the values."""
    if not values_ms:
        return {"p50": math.nan, "p99": math.nan, "max": math.nan}
    if len(values_ms) == 1:
        only = float(values_ms[0])
        return {"p50": only, "p99": only, "max": only}
    cuts = statistics.quantiles(values_ms, n=100, method="inclusive")
    return {"p50": cuts[49], "p99": cuts[98], "max": float(max(values_ms))}


@dataclass(frozen=True)
class PointResult:
    """One rate point of one tree, as printed, written and drawn."""

    tree: str
    fraction: float
    target_eps: float
    achieved_eps: float
    worker_ms: dict[str, float]
    e2e_ms: dict[str, float]
    worker_cpu_us_per_event: float
    sent: int
    received: int
    # share of a core used over the measured window (1.0 = one core busy throughout)
    worker_core_load: float
    harness_core_load: float
    # received_at in the payload equal (to the ms) to the producer's stamp: the worker's part
    # starts at produce
    timestamps_kept: int
    affinity: dict[str, str] = field(default_factory=dict)


COLUMNS = (
    "tree",
    "rate %",
    "target/s",
    "achieved/s",
    "worker p50",
    "p99",
    "max ms",
    "e2e p50",
    "p99",
    "max ms",
    "worker CPU us/event",
    "events recv/sent",
    "worker / harness core",
)


def _ms(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:,.1f}"


def table_rows(points: Sequence[PointResult]) -> list[list[str]]:
    return [
        [
            p.tree,
            f"{100 * p.fraction:g}",
            f"{p.target_eps:,.0f}",
            f"{p.achieved_eps:,.0f}",
            *(_ms(p.worker_ms[k]) for k in ("p50", "p99", "max")),
            *(_ms(p.e2e_ms[k]) for k in ("p50", "p99", "max")),
            f"{p.worker_cpu_us_per_event:,.0f}",
            f"{p.received:,}/{p.sent:,}",
            f"{p.worker_core_load:.2f} / {p.harness_core_load:.2f}",
        ]
        for p in points
    ]


def format_table(points: Sequence[PointResult]) -> str:
    """A Markdown table (it pastes into bench/README.md as it is)."""
    lines = [COLUMNS, ("---",) * len(COLUMNS), *table_rows(points)]
    return "\n".join("| " + " | ".join(row) + " |" for row in lines)


def write_json(path: Path, method: dict[str, Any], trees: list[dict[str, Any]], points) -> None:
    """Every number of the run, with how it was measured, for the lead's records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"method": method, "trees": trees, "points": [asdict(p) for p in points]}
    # NaN is not JSON: a point without samples has null percentiles
    path.write_text(json.dumps(_nan_to_none(doc), indent=2) + "\n")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


def plot(path: Path, points: Sequence[PointResult], title: str) -> bool:
    """p50 and p99 of the worker's part and of end to end against the target rate, per tree,
    on a log scale with the 100 ms bar; False where matplotlib (the train extra) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    trees = list(dict.fromkeys(p.tree for p in points))
    for i, tree in enumerate(trees):
        mine = sorted((p for p in points if p.tree == tree), key=lambda p: p.target_eps)
        x = [p.target_eps for p in mine]
        color = f"C{i}"
        label = f"{tree}: " if len(trees) > 1 else ""
        for part, key, marker in (("worker", "worker_ms", "o"), ("end to end", "e2e_ms", "s")):
            for q, style in (("p50", "-"), ("p99", "--")):
                y = [getattr(p, key)[q] for p in mine]
                ax.plot(x, y, style, marker=marker, color=color, label=f"{label}{part} {q}")
    ax.axhline(BAR_MS, color="grey", linewidth=1, label=f"{BAR_MS:g} ms")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 20, 50, 100 rather than 2 x 10^1
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("target events/s")
    ax.set_ylabel("latency, ms")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
