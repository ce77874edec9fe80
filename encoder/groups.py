"""User groups for "who is served well": activity tertiles on any log, and on MovieLens the
gender and age of its user file.

A grouping is a list of (label, positions) in display order, positions indexing the
evaluated users. Side files are read strictly: a line that does not parse stops the report
with the file and line, rather than silently dropping users from a group.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.text_files import numbered_lines

Grouping = list[tuple[str, np.ndarray]]

# MovieLens 1M's age codes (README of the data set).
ML_AGES = {
    "1": "under 18",
    "18": "18-24",
    "25": "25-34",
    "35": "35-44",
    "45": "45-49",
    "50": "50-55",
    "56": "56+",
}
ML_GENDERS = {"F": "female", "M": "male"}
UNKNOWN = "unknown"


def activity_tertiles(history_lengths: Sequence[int] | np.ndarray) -> Grouping:
    """Light, medium and heavy users by the number of events before their target: cut at the
    33rd and 67th percentiles (a user on a cut goes to the lighter group)."""
    lengths = np.asarray(history_lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    low, high = np.quantile(lengths, [1 / 3, 2 / 3], method="lower")
    bands = [("light", lengths <= low), ("medium", (lengths > low) & (lengths <= high))]
    bands.append(("heavy", lengths > high))
    out = []
    for name, member in bands:
        if member.any():
            span = f"{lengths[member].min()}-{lengths[member].max()} events"
            out.append((f"{name} ({span})", np.flatnonzero(member)))
    return out


def _split(path: Path, line_no: int, line: str, sep: str | None, fields: int) -> list[str]:
    parts = line.split(sep)
    if len(parts) < fields or any(not p.strip() for p in parts[:fields]):
        raise UserError(f"{path}:{line_no}: expected {fields} fields, got {line.strip()!r}")
    return [p.strip() for p in parts]


def read_user_map(path: Path) -> dict[str, str]:
    """``data_user_id original_user_id`` per line -> {data id: original id}."""
    out: dict[str, str] = {}
    for line_no, line in numbered_lines(path):
        data_id, original = _split(path, line_no, line, None, 2)[:2]
        if data_id in out:
            raise UserError(f"{path}:{line_no}: user {data_id} is mapped twice")
        out[data_id] = original
    return out


def read_movielens_users(path: Path) -> dict[str, dict[str, str]]:
    """MovieLens ``UserID::Gender::Age::Occupation::Zip`` -> {user id: {gender, age}}."""
    out: dict[str, dict[str, str]] = {}
    for line_no, line in numbered_lines(path):
        user, gender, age = _split(path, line_no, line, "::", 5)[:3]
        if gender not in ML_GENDERS or age not in ML_AGES:
            raise UserError(f"{path}:{line_no}: unknown gender {gender!r} or age code {age!r}")
        out[user] = {"gender": ML_GENDERS[gender], "age": ML_AGES[age]}
    return out


def attribute_groupings(
    user_ids: Sequence[str], users_file: Path, user_map: Path | None = None
) -> dict[str, Grouping]:
    """Gender and age groupings of the evaluated users (``user_ids`` as in the data file; the
    map translates them to the user file's ids). Users the files do not cover are grouped as
    'unknown'; a users file that covers none of them is an error."""
    people = read_movielens_users(users_file)
    mapping = read_user_map(user_map) if user_map is not None else {}
    keys = [mapping.get(u) for u in user_ids] if user_map is not None else list(user_ids)
    found = [people.get(key) if key is not None else None for key in keys]
    if not any(found):
        raise UserError(f"{users_file}: none of the {len(user_ids)} evaluated users is in it")
    out = {}
    for attribute, order in (("gender", ML_GENDERS.values()), ("age", ML_AGES.values())):
        labels = np.array([f[attribute] if f else UNKNOWN for f in found], dtype=object)
        groups = [(g, np.flatnonzero(labels == g)) for g in [*order, UNKNOWN]]
        out[attribute] = [(g, idx) for g, idx in groups if len(idx)]
    return out
