"""The latency curve's logic (bench/latency_curve.py): rate points, the generator's schedule,
percentiles, CPU lists and the table; no stack, no timing."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load():
    # bench/ is scripts, not a package: load the module from its file
    spec = importlib.util.spec_from_file_location("latency_curve", BENCH / "latency_curve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


lc = _load()


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", {0}), ("1,3", {1, 3}), ("0-2,5", {0, 1, 2, 5}), (" 4 , 2-3 ", {2, 3, 4})],
)
def test_parse_cpus_reads_what_taskset_takes(text: str, cpus: set[int]) -> None:
    assert lc.parse_cpus(text) == cpus
    assert lc.parse_cpus(lc.format_cpus(cpus)) == cpus


@pytest.mark.parametrize("text", ["", "a", "3-1", "1-", "-1", "0,,x"])
def test_parse_cpus_refuses_what_is_not_a_list(text: str) -> None:
    with pytest.raises(ValueError, match="CPU list"):
        lc.parse_cpus(text)


def test_format_cpus_folds_runs() -> None:
    assert lc.format_cpus({5, 0, 1, 2, 7, 8}) == "0-2,5,7-8"


def test_default_cores_split_the_first_two_and_a_single_core_pins_nothing() -> None:
    assert lc.choose_cores(frozenset({0, 1})) == ({0}, {1})
    assert lc.choose_cores(frozenset({2, 3, 5})) == ({2}, {3})
    assert lc.choose_cores(frozenset({0})) is None


def test_asked_cores_must_exist_and_not_overlap() -> None:
    both = frozenset({0, 1})
    assert lc.choose_cores(both, frozenset({1}), None) == ({1}, {0})
    with pytest.raises(ValueError, match="overlap"):
        lc.choose_cores(both, None, frozenset({0}))
    with pytest.raises(ValueError, match="not all available"):
        lc.choose_cores(both, frozenset({4}), frozenset({1}))
    with pytest.raises(ValueError, match="no core left"):
        lc.choose_cores(frozenset({0}), frozenset({0}), None)


def test_pin_and_read_back_this_process() -> None:
    mine = frozenset(os.sched_getaffinity(0))
    lc.pin(os.getpid(), mine)  # the mask it has: changes nothing, proves the calls
    cpus, threads = lc.allowed_cpus(os.getpid())
    assert cpus == mine
    assert threads >= 1


def test_rate_points_are_fractions_of_the_reference() -> None:
    points = lc.rate_points(12_000, lc.DEFAULT_FRACTIONS)
    assert [f for f, _ in points] == [0.1, 0.25, 0.5, 0.75, 0.9]
    assert [round(r) for _, r in points] == [1200, 3000, 6000, 9000, 10800]
    with pytest.raises(ValueError, match="positive"):
        lc.rate_points(12_000, [0.5, 0])
    with pytest.raises(ValueError, match="positive"):
        lc.rate_points(0, [0.5])


def test_phases_split_warmup_measured_and_tail() -> None:
    ph = lc.phases(1000, warmup_s=5, point_s=30, tail_s=1)
    assert (ph.start, ph.end, ph.total) == (5000, 35000, 36000)
    tiny = lc.phases(0.5, warmup_s=0, point_s=0.1, tail_s=0)
    assert tiny.end - tiny.start == 1  # a point always measures something


def test_events_due_paces_evenly_whatever_the_tick() -> None:
    rate, total = 2000.0, 10_000
    assert lc.events_due(-1, rate, total) == 0
    assert lc.events_due(0, rate, total) == 1  # event 0 is due at once
    assert lc.events_due(1.0, rate, total) == 2001
    assert lc.events_due(99.0, rate, total) == total
    for tick in (0.001, 0.01, 0.037):
        sent, ticks, per_tick = 0, 0, []
        while sent < total:
            due = lc.events_due(ticks * tick, rate, total)
            per_tick.append(due - sent)
            sent, ticks = due, ticks + 1
        assert sent == total
        # every tick carries rate * tick events, short of the rounding of two floors
        assert all(abs(n - rate * tick) < 2 for n in per_tick[1:-1])
        assert len(per_tick) == pytest.approx(total / rate / tick, abs=2)


def test_summary_percentiles() -> None:
    values = [float(x) for x in range(1, 101)]  # 1..100 ms
    s = lc.summary(values)
    assert s["p50"] == pytest.approx(50.5)
    assert s["p99"] == pytest.approx(99.01)
    assert s["max"] == 100.0
    few = lc.summary([10.0, 20.0, 1000.0])
    assert few["p99"] <= few["max"] == 1000.0  # inclusive: never beyond the largest
    assert lc.summary([7.0]) == {"p50": 7.0, "p99": 7.0, "max": 7.0}
    assert all(math.isnan(v) for v in lc.summary([]).values())


def _point(tree: str, fraction: float, p99: float) -> object:
    return lc.PointResult(
        tree=tree,
        fraction=fraction,
        target_eps=10_000 * fraction,
        achieved_eps=10_000 * fraction * 0.99,
        worker_ms={"p50": 10.0, "p99": p99, "max": 2 * p99},
        e2e_ms={"p50": 15.0, "p99": p99 + 5, "max": math.nan},
        worker_cpu_us_per_event=80.0,
        sent=1000,
        received=1000,
        worker_core_load=0.5,
        harness_core_load=0.4,
        timestamps_kept=1000,
        affinity={"worker": "0 (9 threads)"},
    )


def test_table_has_a_row_per_point_and_the_columns_asked_for() -> None:
    points = [_point("abc123", 0.1, 40.0), _point("def456", 0.5, 120.0)]
    lines = lc.format_table(points).splitlines()
    assert len(lines) == 2 + len(points)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:4] == ["tree", "rate %", "target/s", "achieved/s"]
    assert "worker CPU us/event" in header
    row = [c.strip() for c in lines[3].strip("|").split("|")]
    assert row[:4] == ["def456", "50", "5,000", "4,950"]
    assert row[5] == "120.0"
    assert row[9] == "nan"


def test_json_has_no_nan(tmp_path: Path) -> None:
    path = tmp_path / "curve.json"
    lc.write_json(path, {"fractions": [0.1]}, [{"label": "abc"}], [_point("abc", 0.1, 50.0)])
    doc = json.loads(path.read_text())  # strict JSON: NaN would not parse in other readers
    assert doc["points"][0]["e2e_ms"]["max"] is None
    assert doc["points"][0]["worker_ms"]["p99"] == 50.0
    assert "NaN" not in path.read_text()


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "curve.png"
    points = [_point(t, f, 30 + 200 * f) for t in ("a", "b") for f in (0.1, 0.5, 0.9)]
    assert lc.plot(path, points, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
