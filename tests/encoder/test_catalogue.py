"""Catalogue files: the three formats, the item map, and one-line errors naming file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import UserError
from encoder.catalogue import read_catalogue, read_item_map


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def test_jsonl_text_and_attributes(tmp_path: Path) -> None:
    path = write(
        tmp_path / "items.jsonl",
        '{"item_id": "p1", "text": "Red shoes", "brand": "Acme", "tags": ["run", "trail"]}\n'
        "\n"
        '{"item_id": 7, "text": " Blue hat "}\n',
    )
    catalogue = read_catalogue(path)
    assert catalogue.item_ids == ["p1", "7"]
    assert catalogue.texts == ["Red shoes. brand: Acme. tags: run, trail", "Blue hat"]
    assert catalogue.unmapped == 0


def test_movielens_latin1_and_tsv(tmp_path: Path) -> None:
    movies = write(
        tmp_path / "movies.dat",
        "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Café (2001)::Drama\n",
        "latin-1",
    )
    catalogue = read_catalogue(movies)
    assert catalogue.item_ids == ["1", "2"]
    assert catalogue.texts == [
        "Toy Story (1995). Genres: Animation, Children's, Comedy",
        "Café (2001). Genres: Drama",
    ]
    tsv = write(tmp_path / "items.tsv", "a\tA lamp\tlighting\nb\tA chair\n")
    assert read_catalogue(tsv).texts == ["A lamp. lighting", "A chair"]


def test_the_item_map_renames_and_leaves_out_what_it_does_not_name(tmp_path: Path) -> None:
    movies = write(tmp_path / "movies.dat", "10::A (1990)::Drama\n20::B (1991)::Comedy\n")
    item_map = write(tmp_path / "map.txt", "1 20\n")
    catalogue = read_catalogue(movies, item_map)
    assert catalogue.item_ids == ["1"]
    assert catalogue.texts == ["B (1991). Genres: Comedy"]
    assert catalogue.unmapped == 1
    assert read_item_map(item_map) == {"20": "1"}


@pytest.mark.parametrize(
    ("name", "text", "line", "reason"),
    [
        ("a.jsonl", '{"item_id": "a", "text": "x"}\n{"item_id": "b"\n', 2, "Expecting"),
        ("a.jsonl", '{"item_id": "a"}\n', 1, "text must be a non-empty string"),
        ("a.jsonl", '{"item_id": "", "text": "x"}\n', 1, "item_id must be"),
        ("a.jsonl", '["a", "x"]\n', 1, "not a JSON object"),
        ("m.dat", "1::A::Drama\n2::B\n", 2, "MovieID::Title::Genres"),
        ("a.tsv", "a\tx\n\nb\n", 3, "item_id<TAB>text"),
        ("a.tsv", "a\tx\nb\ty\na\tz\n", 3, "listed twice \\(line 1\\)"),
    ],
)
def test_a_bad_line_names_file_and_line(
    tmp_path: Path, name: str, text: str, line: int, reason: str
) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(UserError, match=rf"^{path}:{line}: .*{reason}") as info:
        read_catalogue(path)
    assert "\n" not in str(info.value)


def test_bad_item_maps_and_files(tmp_path: Path) -> None:
    catalogue = write(tmp_path / "a.tsv", "a\tx\n")
    bad = write(tmp_path / "map.txt", "1 a\n2 b c\n")
    with pytest.raises(UserError, match=rf"^{bad}:2: expected 'log_item_id catalogue_id'"):
        read_catalogue(catalogue, bad)
    twice = write(tmp_path / "map2.txt", "1 a\n2 a\n")
    with pytest.raises(UserError, match=rf"^{twice}:2: a is mapped twice"):
        read_catalogue(catalogue, twice)
    elsewhere = write(tmp_path / "map3.txt", "1 zz\n")
    with pytest.raises(UserError, match="no items the item map names"):
        read_catalogue(catalogue, elsewhere)
    with pytest.raises(UserError, match="catalogue file not found"):
        read_catalogue(tmp_path / "missing.tsv")
    with pytest.raises(UserError, match="no items"):
        read_catalogue(write(tmp_path / "empty.jsonl", "\n"))
