"""Item titles from a catalogue (MovieLens or TSV, through an item map) and the text of
`interest explain`."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import UserError
from streams.titles import label, load_titles, read_catalogue, render_explanations
from streams.window import WindowEntry
from tests.conftest import shared_data

JAN_1_2026_10H = 1_767_261_600_000  # 2026-01-01 10:00 UTC


def test_movielens_catalogue_is_latin1_and_an_item_map_renames_its_ids(tmp_path: Path) -> None:
    movies = tmp_path / "movies.dat"
    movies.write_bytes(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Jumanji (1995)::Adventure\n"
        "3::Misérables, Les (1995)::Drama\n".encode("latin-1")
    )
    assert read_catalogue(movies)["3"] == "Misérables, Les (1995)"
    item_map = tmp_path / "map.txt"
    item_map.write_text("10 3\n11 1\n12 99\n\n")
    titles = load_titles(movies, item_map)
    # Only the model's ids, and only those the catalogue has.
    assert titles == {"10": "Misérables, Les (1995)", "11": "Toy Story (1995)"}


def test_tsv_catalogue_is_utf8(tmp_path: Path) -> None:
    catalogue = tmp_path / "items.tsv"
    catalogue.write_text("item-1\tCafé au lait\nitem-2\tA: B\textra\n", encoding="utf-8")
    assert load_titles(catalogue) == {"item-1": "Café au lait", "item-2": "A: B"}


def test_bad_files_are_user_errors_naming_the_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read"):
        load_titles(tmp_path / "missing.dat")
    bad = tmp_path / "bad.dat"
    bad.write_text("1::Toy Story::Comedy\njust words\n")
    with pytest.raises(UserError, match=r"bad\.dat:2: expected 'id::title::genres'"):
        load_titles(bad)
    good = tmp_path / "good.dat"
    good.write_text("1::Toy Story::Comedy\n")
    bad_map = tmp_path / "map.txt"
    bad_map.write_text("1 1\n2\n")
    with pytest.raises(UserError, match=r"map\.txt:2: expected 'model_item_id original_id'"):
        load_titles(good, bad_map)


def test_ml1m_titles_through_the_sasrec_item_map() -> None:
    titles = load_titles(
        shared_data("ml-1m_movies.dat"), shared_data("ml-1m_sas_to_original_items.txt")
    )
    assert titles["1"] == "Raiders of the Lost Ark (1981)"  # SASRec item 1 is movie 1198
    assert titles["280"] == "One Flew Over the Cuckoo's Nest (1975)"  # movie 1193
    assert len(titles) > 3000


def test_rendering_names_items_events_times_and_weights() -> None:
    window = [
        WindowEntry("e1", "item-15", "click", JAN_1_2026_10H),
        WindowEntry("e2", "item-4", "purchase", JAN_1_2026_10H + 90_000),
    ]
    explained = {
        "user_id": "u1",
        "model_version": "931ecc0b",
        "items": [
            {
                "item_id": "item-26",
                "score": 0.11649,
                "because": [
                    {"event_id": "e1", "item_id": "item-15", "weight": 0.109},
                    {"event_id": "e2", "item_id": "item-4", "weight": -0.0021},
                ],
            },
            {"item_id": "item-7", "score": -1.5, "because": []},
        ],
    }
    titles = {"item-26": "Toy Story (1995)", "item-15": "Jumanji (1995)"}
    assert render_explanations(explained, window, titles).splitlines() == [
        "user u1, model 931ecc0b: top 2 now",
        "1. Toy Story (1995) [item-26]  score 0.116",
        "     because: Jumanji (1995) [item-15] clicked 2026-01-01 10:00  +0.109",
        "              item-4 purchased 2026-01-01 10:01  -0.002",
        "2. item-7  score -1.500",
        "     because: no event of the window moved its score",
    ]
    one = {**explained, "items": explained["items"][:1]}
    heading = render_explanations(one, window, titles, "item-26").splitlines()[0]
    assert heading == "user u1, model 931ecc0b: item Toy Story (1995) [item-26]"
    assert label("item-9", titles) == "item-9"
