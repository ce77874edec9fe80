"""User groups of the report: activity tertiles, and MovieLens gender and age read strictly
from the side files (a bad line names its file and line)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.errors import UserError
from encoder import metrics
from encoder.groups import activity_tertiles, attribute_groupings
from tests.conftest import shared_data


def test_activity_tertiles_cover_every_user_once_in_order_of_activity() -> None:
    lengths = np.array([3, 40, 7, 100, 5, 60, 9, 200, 4])
    groups = activity_tertiles(lengths)
    assert [label.split()[0] for label, _ in groups] == ["light", "medium", "heavy"]
    assert sorted(np.concatenate([p for _, p in groups]).tolist()) == list(range(len(lengths)))
    light, medium, heavy = (lengths[p] for _, p in groups)
    assert light.max() < medium.min() and medium.max() < heavy.min()
    assert groups[0][0] == "light (3-5 events)"


def _files(tmp: Path, users: str, mapping: str) -> tuple[Path, Path]:
    (tmp / "users.dat").write_text(users)
    (tmp / "map.txt").write_text(mapping)
    return tmp / "users.dat", tmp / "map.txt"


def test_gender_and_age_through_the_id_map(tmp_path: Path) -> None:
    users, mapping = _files(
        tmp_path,
        "10::F::1::10::48067\n20::M::56::16::70072\n30::M::25::15::55117\n",
        "1 20\n2 10\n",
    )
    groups = attribute_groupings(["1", "2", "3"], users, mapping)
    assert [(g, p.tolist()) for g, p in groups["gender"]] == [
        ("female", [1]),
        ("male", [0]),
        ("unknown", [2]),
    ]
    assert [g for g, _ in groups["age"]] == ["under 18", "56+", "unknown"]


@pytest.mark.parametrize(
    ("users", "mapping", "where"),
    [
        ("10::F::1::10::1\n20::M::56\n", "1 10\n", r"users\.dat:2"),
        ("10::X::1::10::1\n", "1 10\n", r"users\.dat:1"),
        ("10::F::1::10::1\n", "1 10\n2\n", r"map\.txt:2"),
        ("10::F::1::10::1\n", "1 10\n1 10\n", r"map\.txt:2"),
    ],
)
def test_a_malformed_side_file_names_its_file_and_line(
    tmp_path: Path, users: str, mapping: str, where: str
) -> None:
    users_file, map_file = _files(tmp_path, users, mapping)
    with pytest.raises(UserError, match=where):
        attribute_groupings(["1"], users_file, map_file)


def test_a_missing_or_unrelated_users_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing\.dat"):
        attribute_groupings(["1"], tmp_path / "missing.dat")
    users, _ = _files(tmp_path, "10::F::1::10::1\n", "")
    with pytest.raises(UserError, match="none of the 2 evaluated users"):
        attribute_groupings(["1", "2"], users)


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_users() -> None:
    rng = np.random.default_rng(1)
    small, large = rng.random(100), rng.random(10_000)
    lo, hi = metrics.bootstrap_interval(small, seed=0)
    assert lo < small.mean() < hi
    assert metrics.bootstrap_interval(small, seed=0) == (lo, hi)  # seeded: reproducible
    lo_l, hi_l = metrics.bootstrap_interval(large, seed=0)
    assert hi_l - lo_l < (hi - lo) / 5
    assert metrics.bootstrap_interval(np.ones(50)) == (1.0, 1.0)


@pytest.mark.data
def test_movielens_1m_users_all_map_to_their_demographics() -> None:
    users = shared_data("ml-1m_users.dat")
    mapping = shared_data("ml-1m_sas_to_original_users.txt")
    groups = attribute_groupings([str(u) for u in range(1, 6041)], users, mapping)
    gender = {g: len(p) for g, p in groups["gender"]}
    assert gender == {"female": 1709, "male": 4331}  # the published ML-1M counts
    assert sum(len(p) for _, p in groups["age"]) == 6040
    assert "unknown" not in dict(groups["age"])
