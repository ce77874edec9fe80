"""Item catalogues: what is known about each item besides its interactions, as one text each.

Three formats, told apart by the file (extension, then the first line):

* ``.jsonl`` / ``.json`` / ``.ndjson``: one object per line, ``{"item_id": ..., "text": ...}``;
  any other field is an attribute and is appended to the text as ``name: value`` (a list's
  values joined by commas), so ``{"item_id": "p1", "text": "Red shoes", "brand": "Acme"}``
  reads ``Red shoes. brand: Acme``.
* MovieLens ``movies.dat``: ``MovieID::Title::Genres`` with ``|`` between genres (latin-1);
  the text is ``Title. Genres: A, B``.
* anything else: TSV, ``item_id<TAB>text``, further columns appended as more text.

The ids are the catalogue's own. Where they are not the event log's (ml-1m's SASRec file
renumbers the movies), an item map of ``log_item_id catalogue_id`` lines translates them, and
catalogue entries the map does not name are left out: they have no id the stream would use.

Every line that does not parse stops the read with ``FILE:LINE: reason``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from common.text_files import numbered_lines

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
MOVIELENS_SEPARATOR = "::"


@dataclass(frozen=True)
class Catalogue:
    """Item ids and their texts, in file order (one text per item)."""

    item_ids: list[str]
    texts: list[str]
    # entries the item map did not name (0 without a map)
    unmapped: int = 0

    def __len__(self) -> int:
        return len(self.item_ids)


def _attribute(name: str, value: object) -> str:
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    return f"{name}: {value}"


def _json_entry(line: str) -> tuple[str, str]:
    entry = json.loads(line)
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    item_id, text = entry.get("item_id"), entry.get("text")
    if not isinstance(item_id, str | int) or isinstance(item_id, bool) or str(item_id) == "":
        raise ValueError("item_id must be a non-empty string or an integer")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string")
    rest = [_attribute(k, v) for k, v in entry.items() if k not in ("item_id", "text")]
    return str(item_id), ". ".join([text.strip(), *rest])


def _movielens_entry(line: str) -> tuple[str, str]:
    parts = line.split(MOVIELENS_SEPARATOR)
    if len(parts) != 3 or not parts[0].strip() or not parts[1].strip():
        raise ValueError(f"expected 'MovieID::Title::Genres', not {line[:80]!r}")
    genres = [g.strip() for g in parts[2].split("|") if g.strip()]
    text = parts[1].strip() + (f". Genres: {', '.join(genres)}" if genres else "")
    return parts[0].strip(), text


def _tsv_entry(line: str) -> tuple[str, str]:
    item_id, _, rest = line.partition("\t")
    texts = [part.strip() for part in rest.split("\t") if part.strip()]
    if not item_id.strip() or not texts:
        raise ValueError(f"expected 'item_id<TAB>text', not {line[:80]!r}")
    return item_id.strip(), ". ".join(texts)


def _entries(path: Path) -> Iterator[tuple[int, str, str]]:
    lines = iter(numbered_lines(path))
    first = next(lines, None)
    if first is None:
        return
    if path.suffix.lower() in JSON_SUFFIXES:
        parse = _json_entry
    elif MOVIELENS_SEPARATOR in first[1]:
        parse = _movielens_entry
    else:
        parse = _tsv_entry
    for number, line in (first, *lines):
        try:
            item_id, text = parse(line)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise UserError(f"{path}:{number}: {exc}") from None
        yield number, item_id, text


def read_item_map(path: Path) -> dict[str, str]:
    """Catalogue id -> log item id from ``log_item_id catalogue_id`` lines."""
    path = Path(path)
    to_log: dict[str, str] = {}
    seen_at: dict[str, int] = {}
    for number, line in numbered_lines(path):
        fields = line.split()
        if len(fields) != 2:
            raise UserError(f"{path}:{number}: expected 'log_item_id catalogue_id', not {line!r}")
        log_id, catalogue_id = fields
        if log_id in seen_at:
            raise UserError(f"{path}:{number}: {log_id} is mapped twice (line {seen_at[log_id]})")
        if catalogue_id in to_log:
            raise UserError(f"{path}:{number}: {catalogue_id} is mapped twice")
        seen_at[log_id] = number
        to_log[catalogue_id] = log_id
    return to_log


def read_catalogue(path: Path, item_map: Path | None = None) -> Catalogue:
    """The catalogue's items and texts, under the log's ids when ``item_map`` is given."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"catalogue file not found: {path}")
    to_log = read_item_map(item_map) if item_map is not None else None
    ids: list[str] = []
    texts: list[str] = []
    first_line: dict[str, int] = {}
    unmapped = 0
    for number, item_id, text in _entries(path):
        if item_id in first_line:
            raise UserError(
                f"{path}:{number}: item {item_id} is listed twice (line {first_line[item_id]})"
            )
        first_line[item_id] = number
        if to_log is not None:
            if item_id not in to_log:
                unmapped += 1
                continue
            item_id = to_log[item_id]
        ids.append(item_id)
        texts.append(text)
    if not ids:
        raise UserError(f"{path}: no items" + (" the item map names" if to_log else ""))
    return Catalogue(ids, texts, unmapped)
