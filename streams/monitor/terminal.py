"""`interest lag --watch`: the monitor's snapshot as a table in the terminal, redrawn in place."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from streams.monitor.collector import Collector
from streams.settings import Settings

STYLES = {"OK": "green", "WARN": "yellow", "STALL": "red", "STOP": "red", "ERR": "bold red"}


def render(snapshot: dict[str, Any]) -> Group:
    """The snapshot's numbers, the same the page shows."""
    parts: list[Any] = []
    if snapshot["error"]:
        parts.append(Text(f"error: {snapshot['error']}", style="bold red"))
    for group in snapshot["groups"]:
        table = Table(
            "topic",
            "partition",
            "committed",
            "end",
            "lag",
            "lag s",
            "status",
            title=f"{group['group']}  members {_text(group['members'])}  {group['status']}",
        )
        for p in group["partitions"]:
            table.add_row(
                p["topic"],
                str(p["partition"]),
                _text(p["committed"]),
                str(p["end"]),
                str(p["lag"]),
                _text(p["lag_seconds"]),
                Text(p["status"], style=STYLES[p["status"]]),
            )
        table.add_section()
        table.add_row("total", "", "", "", str(group["lag"]), _text(group["lag_seconds"]))
        parts.append(table)
    parts.append(Text(_summary(snapshot)))
    return Group(*parts)


def _summary(snapshot: dict[str, Any]) -> str:
    rates, latency = snapshot["rates"], snapshot["latency"]
    letters = ", ".join(f"{r} {v}/s" for r, v in rates["dead_letters_per_s"].items()) or "none"
    models = ", ".join(
        f"{m['version']} (hit rate {_text(m['hit_rate'])})" for m in snapshot["models"]
    )
    return (
        f"in {_text(rates['events_in_per_s'])}/s  out "
        f"{_text(rates['recommendations_out_per_s'])}/s  dead letters: {letters}\n"
        f"latency p50 {_text(latency['p50_ms'])} ms  p99 {_text(latency['p99_ms'])} ms"
        f" ({latency['samples']} in {latency['window_seconds']:.0f} s)  models: {models or '-'}"
    )


def _text(value: object) -> str:
    return "-" if value is None else str(value)


def watch(settings: Settings, groups: Sequence[str], interval_seconds: float) -> None:
    """Redraw every interval until Ctrl-C."""
    collector = Collector(settings, groups, interval_seconds)
    try:
        with Live(render(collector.collect()), auto_refresh=False) as live:
            while True:
                time.sleep(interval_seconds)
                live.update(render(collector.collect()), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        collector.close()
