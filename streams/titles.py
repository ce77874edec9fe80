"""Explanations for people: item titles from a catalogue, and the text `interest explain` prints.

A catalogue is either MovieLens' `movies.dat` (`id::title::genres`, latin-1) or a TSV of
`id<TAB>title` (UTF-8). Its ids are often not the model's: ml-1m's SASRec file renumbers the
movies, so an item map (`model_item_id original_id` per line) translates the model's ids to the
catalogue's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.text_files import numbered_lines
from streams.window import WindowEntry

# How an event reads in "because: <item> clicked <time>"; an unlisted type reads as itself.
PAST_TENSE = {
    "click": "clicked",
    "view": "viewed",
    "purchase": "purchased",
    "add_to_cart": "added to cart",
}


def read_catalogue(path: Path) -> dict[str, str]:
    """Item id -> title from `id::title::genres` or `id<TAB>title` lines."""
    titles: dict[str, str] = {}
    for number, line in numbered_lines(path):
        separator = "::" if "::" in line else "\t"
        item_id, found, rest = line.partition(separator)
        title = rest.split(separator, 1)[0].strip()
        if not found or not item_id.strip() or not title:
            raise UserError(
                f"{path}:{number}: expected 'id::title::genres' or 'id<TAB>title', "
                f"not {line[:80]!r}"
            )
        titles[item_id.strip()] = title
    return titles


def read_item_map(path: Path) -> dict[str, str]:
    """Model item id -> catalogue id from `model_item_id original_id` lines."""
    ids: dict[str, str] = {}
    for number, line in numbered_lines(path):
        fields = line.split()
        if len(fields) != 2:
            raise UserError(
                f"{path}:{number}: expected 'model_item_id original_id', not {line[:80]!r}"
            )
        ids[fields[0]] = fields[1]
    return ids


def load_titles(catalogue: Path, item_map: Path | None = None) -> dict[str, str]:
    """Model item id -> title; ids the catalogue lacks are left out (shown as bare ids)."""
    titles = read_catalogue(catalogue)
    if item_map is None:
        return titles
    return {
        model_id: titles[original]
        for model_id, original in read_item_map(item_map).items()
        if original in titles
    }


def label(item_id: str, titles: Mapping[str, str]) -> str:
    """`Title [item_id]`, or the bare id when the catalogue has no title for it."""
    title = titles.get(item_id)
    return f"{title} [{item_id}]" if title else item_id


def _when(timestamp_ms: int) -> str:
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def _reason(
    reason: Mapping[str, Any], events: Mapping[str, WindowEntry], titles: Mapping[str, str]
) -> str:
    """One event that drove an item: what the user did, when (UTC), and its weight."""
    text = label(reason["item_id"], titles)
    entry = events.get(reason["event_id"])
    if entry is not None:
        text += f" {PAST_TENSE.get(entry.event_type, entry.event_type)} {_when(entry.timestamp_ms)}"
    return f"{text}  {reason['weight']:+.3f}"


def render_explanations(
    explained: Mapping[str, Any],
    window: Sequence[WindowEntry],
    titles: Mapping[str, str],
    item_id: str | None = None,
) -> str:
    """The text of `interest explain`: ``explained`` as streams/explain.py's `explain_user`
    returns it, the events it names looked up in the user's ``window`` for their type and time.
    ``item_id``: the item asked about, if one was."""
    events = {entry.event_id: entry for entry in window}
    items = explained["items"]
    asked = f"item {label(item_id, titles)}" if item_id else f"top {len(items)} now"
    lines = [f"user {explained['user_id']}, model {explained['model_version']}: {asked}"]
    for rank, item in enumerate(items, 1):
        lines.append(f"{rank}. {label(item['item_id'], titles)}  score {item['score']:.3f}")
        reasons = [_reason(reason, events, titles) for reason in item["because"]]
        lead = "     because: "
        if not reasons:
            lines.append(f"{lead}no event of the window moved its score")
        for n, reason in enumerate(reasons):
            lines.append((lead if n == 0 else " " * len(lead)) + reason)
    return "\n".join(lines)
