"""The page of ``interest evaluate --report DIR``: report.json, three PNG plots and one HTML page
that shows them, drawn from the dict encoder/report.py builds.

The plots are drawn on fresh ``Figure`` objects with the Agg canvas, never through pyplot: no
display is needed, and several reports in one process share no global figure state.
The page is one file with inline CSS and images by relative name, so the folder can be copied
or served as it is.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110
SYSTEMS = ("model", "popularity")
COLORS = {"model": "#1f77b4", "popularity": "#ff7f0e", "training": "#7f7f7f"}
SYSTEM_LABELS = {"model": "model", "popularity": "popularity baseline", "training": "training"}

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
.meta { color: #555; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; }
th { background: #f2f2f2; text-align: left; }
td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
tr.chosen td { background: #fff3d6; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #444; max-width: 900px; }
"""


def write_report_page(report: dict, out_dir: Path) -> Path:
    """Write report.json, tradeoff.png, groups.png, exposure.png and report.html into out_dir
    (created if missing); return the path of report.html."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, sort_keys=True)
    (out_dir / "report.json").write_text(text + "\n", encoding="utf-8")
    _save(_tradeoff_figure(report), out_dir / "tradeoff.png")
    _save(_groups_figure(report["groups"]), out_dir / "groups.png")
    _save(_exposure_figure(report), out_dir / "exposure.png")
    page = out_dir / "report.html"
    page.write_text(_page(report), encoding="utf-8")
    return page


# ---- numbers as text ------------------------------------------------------------------------


def _num(value: float | None, decimals: int = 4) -> str:
    """A missing or NaN value (an empty group) shows as a dash, not as an error."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{decimals}f}"


def _with_ci(accuracy: dict, key: str) -> str:
    ci = accuracy.get(f"{key}_ci")
    text = _num(accuracy.get(key))
    return f"{text} [{_num(ci[0])}, {_num(ci[1])}]" if ci else text


def _penalty(value: float) -> str:
    return f"{value:g}"


def _plain(text: str) -> str:
    """Matplotlib reads a pair of '$' as math; a label from the data is shown as written."""
    return str(text).replace("$", r"\$")


# ---- plots ----------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig).print_png(path)


def _tradeoff_figure(report: dict) -> Figure:
    fig = Figure(figsize=(11, 4.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    panels = (
        ("long_tail_share", "long-tail share of recommended slots (further right: more reach)"),
        ("gini", "Gini index of item exposure (further left: more even)"),
    )
    for ax, (key, xlabel) in zip(axes, panels, strict=True):
        _tradeoff_panel(ax, report, key)
        ax.set_xlabel(xlabel)
    fig.suptitle("Accuracy for reach: NDCG@10 per popularity penalty (labels: penalty)")
    return fig


def _tradeoff_panel(ax: Axes, report: dict, key: str) -> None:
    rows = report["tradeoff"]
    x = [row[key] for row in rows]
    y = [row["ndcg@10"] for row in rows]
    ax.plot(x, y, "o-", color=COLORS["model"], label="model, re-ranked with the penalty")
    for row in rows:
        ax.annotate(
            _penalty(row["penalty"]),
            (row[key], row["ndcg@10"]),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=8,
        )
    _mark_chosen(ax, report, key)
    popularity = report["systems"]["popularity"]
    ax.scatter(
        [popularity["exposure"][key]],
        [popularity["accuracy"]["ndcg@10"]],
        marker="*",
        s=260,
        color=COLORS["popularity"],
        zorder=3,
        label="popularity baseline",
    )
    ax.set_ylabel("NDCG@10 (higher: more accurate)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _mark_chosen(ax: Axes, report: dict, key: str) -> None:
    """A ring around the penalty the report's model figures use, so the table and curve meet."""
    index = _chosen_index(report)
    if index < 0:
        return
    row = report["tradeoff"][index]
    ax.scatter(
        [row[key]],
        [row["ndcg@10"]],
        s=220,
        facecolors="none",
        edgecolors="#d62728",
        linewidths=2,
        zorder=4,
        label=f"penalty of this report ({_penalty(row['penalty'])})",
    )


def _groups_figure(groups: dict) -> Figure:
    names = list(groups)
    fig = Figure(figsize=(9.5, 3.6 * len(names)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, names, strict=True):
        _groups_panel(ax, name, groups[name])
    fig.suptitle("NDCG@10 per user group (error bars: bootstrap confidence interval)")
    return fig


def _groups_panel(ax: Axes, name: str, rows: Sequence[dict]) -> None:
    x = np.arange(len(rows))
    width = 0.38
    for offset, system in ((-width / 2, "model"), (width / 2, "popularity")):
        ax.bar(
            x + offset,
            [row[system]["ndcg@10"] for row in rows],
            width,
            yerr=_yerr(rows, system),
            capsize=4,
            color=COLORS[system],
            label=SYSTEM_LABELS[system],
        )
    ax.set_xticks(x, [f"{_plain(row['group'])}\n{row['users']} users" for row in rows])
    ax.set_title(f"by {_plain(name)}")
    ax.set_ylabel("NDCG@10")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _yerr(rows: Sequence[dict], system: str) -> np.ndarray:
    """Asymmetric error bars (2, n) from the CI bounds; a missing CI draws no bar."""
    below, above = [], []
    for row in rows:
        value = row[system]["ndcg@10"]
        low, high = row[system].get("ndcg@10_ci") or (value, value)
        below.append(max(value - low, 0.0))
        above.append(max(high - value, 0.0))
    return np.array([below, above])


def _exposure_figure(report: dict) -> Figure:
    fig = Figure(figsize=(6.6, 5.6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="equality (every item equally)")
    for name in ("model", "popularity", "training"):
        curve = report["lorenz"].get(name)
        if curve:
            ax.plot(
                np.linspace(0.0, 1.0, len(curve)),
                curve,
                color=COLORS[name],
                linewidth=2,
                label=_lorenz_label(report, name),
            )
    ax.set_xlabel("share of items (least exposed first)")
    ax.set_ylabel("share of recommended slots")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Exposure concentration (Lorenz curves)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _lorenz_label(report: dict, name: str) -> str:
    if name == "training":
        return "training events"
    gini = report["systems"][name]["exposure"]["gini"]
    return f"{SYSTEM_LABELS[name]} (Gini {_num(gini, 3)})"


# ---- page -----------------------------------------------------------------------------------


def _page(report: dict) -> str:
    title = "Accuracy and reach: popularity bias and fairness report"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _summary(report),
        _systems_section(report["systems"]),
        _groups_section(report["groups"]),
        _tradeoff_section(report),
        _figures_section(report),
        _definitions_section(report),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], marked: int = -1) -> str:
    """Every header and cell is escaped here, so no caller can forget to."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f"<td>{html.escape(str(c))}</td>" for c in row)
        attr = ' class="chosen"' if i == marked else ""
        body.append(f"<tr{attr}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _summary(report: dict) -> str:
    fields = [
        ("data", report.get("data")),
        ("model", report.get("model")),
        ("split", report.get("split")),
        ("k", report.get("k")),
        ("users", report.get("users")),
        ("items", report.get("items")),
        ("popularity penalty", _maybe_penalty(report.get("popularity_penalty"))),
    ]
    text = " · ".join(f"{name}: {value}" for name, value in fields if value is not None)
    return f'<p class="meta">{html.escape(text)}</p>'


def _maybe_penalty(value: float | None) -> str | None:
    return None if value is None else _penalty(value)


def _systems_section(systems: dict) -> str:
    metrics = [
        ("NDCG@10 [CI]", lambda s: _with_ci(s["accuracy"], "ndcg@10")),
        ("HR@10 [CI]", lambda s: _with_ci(s["accuracy"], "hr@10")),
        ("average popularity", lambda s: _num(s["exposure"]["average_popularity"], 1)),
        ("Gini", lambda s: _num(s["exposure"]["gini"])),
        ("long-tail share", lambda s: _num(s["exposure"]["long_tail_share"])),
        ("coverage", lambda s: _num(s["exposure"]["coverage"])),
        ("novelty", lambda s: _num(s["exposure"]["novelty"], 1)),
    ]
    rows = [[label, *(cell(systems[name]) for name in SYSTEMS)] for label, cell in metrics]
    headers = ["metric", *(SYSTEM_LABELS[name] for name in SYSTEMS)]
    return "<h2>Accuracy and reach, side by side</h2>\n" + _table(headers, rows)


def _groups_section(groups: dict) -> str:
    headers = [
        "group",
        "users",
        "model NDCG@10 [CI]",
        "popularity NDCG@10 [CI]",
        "model HR@10 [CI]",
        "popularity HR@10 [CI]",
    ]
    parts = []
    for name, rows in groups.items():
        cells = [_group_row(row) for row in rows]
        parts.append(f"<h2>Accuracy by {html.escape(str(name))}</h2>\n{_table(headers, cells)}")
    return "\n".join(parts)


def _group_row(row: dict) -> list[str]:
    return [
        str(row["group"]),
        str(row["users"]),
        _with_ci(row["model"], "ndcg@10"),
        _with_ci(row["popularity"], "ndcg@10"),
        _with_ci(row["model"], "hr@10"),
        _with_ci(row["popularity"], "hr@10"),
    ]


def _tradeoff_section(report: dict) -> str:
    headers = [
        "penalty",
        "NDCG@10",
        "HR@10",
        "long-tail share",
        "Gini",
        "coverage",
        "avg popularity",
        "novelty",
    ]
    rows = [
        [
            _penalty(r["penalty"]),
            _num(r["ndcg@10"]),
            _num(r["hr@10"]),
            _num(r["long_tail_share"]),
            _num(r["gini"]),
            _num(r["coverage"]),
            _num(r["average_popularity"], 1),
            _num(r["novelty"], 1),
        ]
        for r in report["tradeoff"]
    ]
    marked = _chosen_index(report)
    note = "<p>The highlighted row is the penalty the model's figures above were ranked with.</p>"
    return "<h2>Trading accuracy for reach</h2>\n" + _table(headers, rows, marked) + note


def _chosen_index(report: dict) -> int:
    """Row of the trade-off the model system was ranked with, -1 when none matches."""
    chosen = report.get("popularity_penalty")
    for i, row in enumerate(report["tradeoff"]):
        if chosen is not None and math.isclose(row["penalty"], chosen):
            return i
    return -1


def _figures_section(report: dict) -> str:
    level = report.get("bootstrap", {}).get("level")
    ci = f"{level:.0%} bootstrap confidence interval" if level else "bootstrap confidence interval"
    captions = [
        (
            "tradeoff.png",
            "Each dot is one popularity penalty (its value beside it): higher is more accurate; "
            "further right on the left panel reaches more long-tail items, further left on the "
            "right panel spreads exposure more evenly. The star is the popularity baseline, the "
            "ring the penalty this report's model figures use.",
        ),
        (
            "groups.png",
            f"NDCG@10 of each user group for the model and the popularity baseline; whiskers are "
            f"the {ci} over the group's users. A group well below the others is served worse.",
        ),
        (
            "exposure.png",
            "A point (x, y) says the least-recommended x share of the catalogue holds y share of "
            "all recommended slots; the further a curve sags below the diagonal, the more "
            "exposure concentrates on few items (the higher the Gini).",
        ),
    ]
    figures = [
        f'<figure><img src="{name}" alt="{html.escape(name)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for name, caption in captions
    ]
    return "<h2>Plots</h2>\n" + "\n".join(figures)


def _definitions_section(report: dict) -> str:
    head = report.get("head_share")
    head_text = f"the most popular {head:.0%} of items" if head else "the most popular items"
    boot = report.get("bootstrap", {})
    definitions = [
        ("average popularity", "mean training-event count of the recommended items."),
        (
            "Gini",
            "Gini index of how often each catalogue item is recommended "
            "(0 = every item equally, 1 = one item only).",
        ),
        (
            "long-tail share",
            f"share of recommended slots whose item is outside the head ({head_text} by "
            "training events).",
        ),
        ("coverage", "share of the catalogue recommended to at least one user."),
        (
            "novelty",
            "mean self-information -log2(p) of recommended items, p = the item's share of "
            "training events.",
        ),
        ("CI", f"bootstrap percentile interval over users{_bootstrap_text(boot)}."),
        (
            "penalty",
            "the popularity penalty of the re-ranking that trades accuracy for reach; the "
            "model's figures use the one named at the top.",
        ),
    ]
    items = "".join(
        f"<li><b>{html.escape(term)}</b>: {html.escape(text)}</li>" for term, text in definitions
    )
    return f"<h2>Definitions</h2>\n<ul>{items}</ul>"


def _bootstrap_text(boot: dict) -> str:
    parts = []
    if "resamples" in boot:
        parts.append(f"{boot['resamples']} resamples")
    if "level" in boot:
        parts.append(f"level {boot['level']:.0%}")
    if "seed" in boot:
        parts.append(f"seed {boot['seed']}")
    return f" ({', '.join(parts)})" if parts else ""
