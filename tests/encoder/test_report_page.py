"""The report page: JSON, plots and HTML from a synthetic report dict."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from encoder.report_page import write_report_page

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("tradeoff.png", "groups.png", "exposure.png")
PENALTIES = (0.0, 0.25, 0.5, 1.0)


def _accuracy(ndcg: float, hr: float) -> dict:
    return {
        "ndcg@10": ndcg,
        "ndcg@10_ci": [ndcg - 0.01, ndcg + 0.01],
        "hr@10": hr,
        "hr@10_ci": [hr - 0.02, hr + 0.02],
    }


def _group(label: str, users: int, ndcg: float) -> dict:
    return {
        "group": label,
        "users": users,
        "model": _accuracy(ndcg, ndcg + 0.1),
        "popularity": _accuracy(ndcg / 4, ndcg / 2),
    }


def _system(ndcg: float, hr: float, popularity: float, gini: float, tail: float) -> dict:
    return {
        "accuracy": _accuracy(ndcg, hr),
        "exposure": {
            "average_popularity": popularity,
            "gini": gini,
            "long_tail_share": tail,
            "coverage": 1.0 - gini / 2,
            "novelty": 12.0 - popularity / 200,
        },
    }


def _tradeoff(penalty: float) -> dict:
    return {
        "penalty": penalty,
        "ndcg@10": 0.18 - 0.03 * penalty,
        "hr@10": 0.31 - 0.05 * penalty,
        "long_tail_share": 0.11 + 0.2 * penalty,
        "gini": 0.87 - 0.15 * penalty,
        "coverage": 0.42 + 0.3 * penalty,
        "average_popularity": 812.4 - 300 * penalty,
        "novelty": 10.3 + 2 * penalty,
    }


def _report(demographics: bool = True) -> dict:
    groups = {
        "activity": [
            _group("light (3-52 events)", 2013, 0.15),
            _group("medium (53-180 events)", 2014, 0.18),
            _group("heavy (181-2314 events)", 2013, 0.21),
        ]
    }
    if demographics:
        groups["gender"] = [_group("female", 1709, 0.17), _group("male", 4331, 0.185)]
        groups["age"] = [_group(label, 800, 0.16) for label in ("Under 18", "18-24", "25-34")]
    return {
        "data": "/data/ml-1m.txt",
        "model": "/models/ml-1m",
        "split": "test",
        "k": 10,
        "users": 6040,
        "items": 3416,
        "head_share": 0.2,
        "popularity_penalty": 0.25,
        "bootstrap": {"resamples": 1000, "level": 0.95, "seed": 0},
        "systems": {
            "model": _system(0.18, 0.31, 812.4, 0.87, 0.11),
            "popularity": _system(0.04, 0.08, 1950.0, 0.99, 0.0),
        },
        "groups": groups,
        "tradeoff": [_tradeoff(p) for p in PENALTIES],
        "lorenz": {
            "model": [(i / 100) ** 4 for i in range(101)],
            "popularity": [(i / 100) ** 30 for i in range(101)],
            "training": [(i / 100) ** 3 for i in range(101)],
        },
    }


def _png_height(path: Path) -> int:
    """Height from the IHDR chunk, which follows the signature at a fixed offset."""
    return int.from_bytes(path.read_bytes()[20:24], "big")


def test_writes_json_plots_and_page(tmp_path: Path) -> None:
    report = _report()
    out = tmp_path / "new" / "report"
    page = write_report_page(report, out)
    assert page == out / "report.html"
    assert json.loads((out / "report.json").read_text()) == report
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 5_000


def test_page_shows_groups_penalties_and_numbers(tmp_path: Path) -> None:
    report = _report()
    page = write_report_page(report, tmp_path).read_text()
    for name in PLOTS:
        assert f'src="{name}"' in page
    for rows in report["groups"].values():
        for row in rows:
            assert f"<td>{row['group']}</td>" in page
    for penalty in ("<td>0</td>", "<td>0.25</td>", "<td>0.5</td>", "<td>1</td>"):
        assert penalty in page
    assert "<td>0.1800 [0.1700, 0.1900]</td>" in page  # the model's NDCG@10 with its CI
    assert "<td>812.4</td>" in page  # average popularity, one decimal
    assert "Accuracy and reach, side by side" in page
    assert 'class="chosen"' in page  # the report's penalty row is marked


def test_group_label_from_the_data_is_escaped(tmp_path: Path) -> None:
    report = _report()
    report["groups"]["gender"][0]["group"] = "<script>alert(1)</script>"
    page = write_report_page(report, tmp_path).read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_page_without_gender_and_age(tmp_path: Path) -> None:
    full = write_report_page(_report(), tmp_path / "full").parent
    page = write_report_page(_report(demographics=False), tmp_path / "activity")
    text = page.read_text()
    assert "Accuracy by activity" in text
    assert "Accuracy by gender" not in text
    groups_png = page.parent / "groups.png"
    assert groups_png.read_bytes().startswith(PNG_SIGNATURE)
    assert _png_height(groups_png) < _png_height(full / "groups.png")  # one panel, not three


def test_tradeoff_plot_follows_the_data(tmp_path: Path) -> None:
    report = _report()
    changed = copy.deepcopy(report)
    for row in changed["tradeoff"]:
        row["ndcg@10"] *= 0.5
        row["long_tail_share"] += 0.3
    same = write_report_page(report, tmp_path / "a").parent / "tradeoff.png"
    again = write_report_page(copy.deepcopy(report), tmp_path / "b").parent / "tradeoff.png"
    other = write_report_page(changed, tmp_path / "c").parent / "tradeoff.png"
    assert same.read_bytes() == again.read_bytes()  # drawing is deterministic ...
    assert same.read_bytes() != other.read_bytes()  # ... so a difference comes from the data
