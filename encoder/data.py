"""Behaviour logs -> per-user index sequences -> padded tensors for training and evaluation.

Four input formats, picked by file extension (and, for ``.csv``, by the first line):

* ``.jsonl`` / ``.json``: one event per line in the service's event format
  (user_id, item_id, event_type, timestamp as epoch ms or ISO-8601).
* ``.csv`` with a header: user/item/type/timestamp columns (``user_id``, ``item_id``,
  ``event_type`` are accepted too; type and timestamp are optional; ``category`` or
  ``category_id`` gives each item a category).
* ``.csv`` without a header whose first line is ``user,item,category,behavior,timestamp`` with
  behavior in pv/cart/fav/buy: Alibaba's Taobao UserBehavior log (``USER_BEHAVIOR_TYPES``:
  pv -> view, cart -> add_to_cart, fav -> favorite, buy -> purchase; timestamps in epoch
  seconds, as that log has them).
* anything else: SASRec format, ``user item`` per line, each user's lines in time order. No type
  and no time: every event gets the default type and gap bucket 0 (unknown).

String ids are mapped to indices (items 1..N, 0 = padding); the vocabulary is saved with the
model. Split: leave-one-out, the last event of each user is the test target, the second to last
the validation target (users with fewer than 3 events only train), as in SASRec. Training may
use the validation target of users outside the validation sample (``train_batch(held_out=...)``).

Everything per user happens once, here, with numpy; the training loop only slices tensors.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from encoder.features import (
    DEFAULT_EVENT_TYPE,
    DEFAULT_TIME_BUCKETS,
    event_type_index,
    time_gap_bucket,
)

# Taobao UserBehavior behaviours -> event types. Why fav gets a type of its own: a favourite is
# neither a view (it is a deliberate act) nor a cart (no intent to buy now), and the model
# learns what each type is worth from the data rather than from a guess made here.
USER_BEHAVIOR_TYPES = {"pv": "view", "cart": "add_to_cart", "fav": "favorite", "buy": "purchase"}
USER_BEHAVIOR_COLUMNS = "user,item,category,behavior,timestamp"


@dataclass
class UserSequence:
    items: np.ndarray  # (n,) int64 item indices, time order
    types: np.ndarray  # (n,) int64 event type indices
    gaps: np.ndarray  # (n,) int64 time-gap buckets


@dataclass
class Interactions:
    """All users' event sequences plus the id vocabularies."""

    user_ids: list[str]
    item_ids: list[str]  # item index i (1-based) is item_ids[i - 1]
    sequences: list[UserSequence]
    # Per item (aligned with item_ids), its category, when the log gives one for every item.
    item_categories: list[str] | None = None

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_events(self) -> int:
        return sum(len(s.items) for s in self.sequences)


# ---------------------------------------------------------------------------------- parsing


def parse_timestamp(value: object) -> float:
    """Epoch milliseconds (int/float or digit string) or ISO-8601 string -> epoch seconds."""
    if isinstance(value, bool):
        raise ValueError("timestamp must be a number or an ISO-8601 string")
    if isinstance(value, int | float):
        return float(value) / 1000.0
    if isinstance(value, str):
        s = value.strip()
        try:
            return float(s) / 1000.0
        except ValueError:
            pass
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            raise ValueError(f"bad timestamp {value!r}") from None
        if dt.tzinfo is None:  # naive times are taken as UTC
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    raise ValueError("timestamp must be a number or an ISO-8601 string")


# (user, item, type index, epoch seconds or None, item category or None) per event, file order
RawEvent = tuple[str, str, int, float | None, str | None]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, line


def _read_sasrec(path: Path) -> Iterator[RawEvent]:
    for lineno, line in _lines(path):
        parts = line.split()
        if len(parts) != 2:
            raise UserError(f"{path}:{lineno}: expected 'user item', got {line.strip()[:80]!r}")
        yield parts[0], parts[1], DEFAULT_EVENT_TYPE, None, None


def _read_jsonl(path: Path) -> Iterator[RawEvent]:
    for lineno, line in _lines(path):
        try:
            ev = json.loads(line)
            if not isinstance(ev, dict):
                raise ValueError("not a JSON object")
            user, item = ev["user_id"], ev["item_id"]
            if not isinstance(user, str | int) or not isinstance(item, str | int):
                raise ValueError("user_id and item_id must be strings")
            etype = event_type_index(ev.get("event_type", "click"))
            ts = parse_timestamp(ev["timestamp"]) if "timestamp" in ev else None
        except KeyError as exc:
            raise UserError(f"{path}:{lineno}: missing field {exc.args[0]!r}") from None
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise UserError(f"{path}:{lineno}: {exc}") from None
        yield str(user), str(item), etype, ts, None


_CSV_COLUMNS = {
    "user": ("user", "user_id"),
    "item": ("item", "item_id"),
    "type": ("type", "event_type"),
    "timestamp": ("timestamp", "time", "ts"),
    "category": ("category", "category_id"),
}


def _read_csv(path: Path) -> Iterator[RawEvent]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        col: dict[str, int] = {}
        for name, aliases in _CSV_COLUMNS.items():
            for a in aliases:
                if a in header:
                    col[name] = header.index(a)
                    break
        if "user" not in col or "item" not in col:
            raise UserError(
                f"{path}:1: CSV header needs user and item columns, got {header} (a log "
                f"without a header must be UserBehavior lines: {USER_BEHAVIOR_COLUMNS}, "
                "behavior one of pv, cart, fav, buy)"
            )
        for row in reader:
            lineno = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            try:
                if len(row) != len(header):
                    raise ValueError(f"expected {len(header)} columns, got {len(row)}")
                etype = event_type_index(row[col["type"]].strip()) if "type" in col else 0
                ts = parse_timestamp(row[col["timestamp"]]) if "timestamp" in col else None
            except ValueError as exc:
                raise UserError(f"{path}:{lineno}: {exc}") from None
            category = (row[col["category"]].strip() or None) if "category" in col else None
            yield row[col["user"]].strip(), row[col["item"]].strip(), etype, ts, category


def _user_behavior_fields(line: str) -> tuple[str, str, str, str, float]:
    """One UserBehavior line -> (user, item, category, event type, epoch seconds)."""
    parts = [p.strip() for p in line.rstrip("\r\n").split(",")]
    if len(parts) != 5:
        raise ValueError(f"expected 5 columns ({USER_BEHAVIOR_COLUMNS}), got {len(parts)}")
    user, item, category, behavior, stamp = parts
    if not user or not item:
        raise ValueError("empty user or item")
    if behavior not in USER_BEHAVIOR_TYPES:
        raise ValueError(f"unknown behavior {behavior!r}, expected one of pv, cart, fav, buy")
    try:
        seconds = float(int(stamp))
    except ValueError:
        raise ValueError(f"bad timestamp {stamp!r} (epoch seconds)") from None
    return user, item, category, USER_BEHAVIOR_TYPES[behavior], seconds


def is_user_behavior(path: Path) -> bool:
    """True when the file's first line reads as a UserBehavior event (no header)."""
    for _, line in _lines(path):
        try:
            _user_behavior_fields(line)
        except ValueError:
            return False
        return True
    return False


def _read_user_behavior(path: Path) -> Iterator[RawEvent]:
    for lineno, line in _lines(path):
        try:
            user, item, category, etype, seconds = _user_behavior_fields(line)
        except ValueError as exc:
            raise UserError(f"{path}:{lineno}: {exc}") from None
        yield user, item, event_type_index(etype), seconds, category


def read_events(path: Path) -> Iterator[RawEvent]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".csv":
        return _read_user_behavior(path) if is_user_behavior(path) else _read_csv(path)
    return _read_sasrec(path)


def load_interactions(
    path: Path,
    item_ids: list[str] | None = None,
    n_time_buckets: int = DEFAULT_TIME_BUCKETS,
) -> Interactions:
    """Read a log into per-user sequences.

    With ``item_ids`` (a trained model's vocabulary) the item indices follow it and events with
    unknown items are dropped; otherwise the vocabulary is built in order of first appearance.
    Events with timestamps are sorted per user by time (stable); without, file order is kept.
    """
    vocab: dict[str, int] = {s: i + 1 for i, s in enumerate(item_ids)} if item_ids else {}
    frozen = item_ids is not None
    users: dict[str, list[tuple[int, int, float | None]]] = {}
    categories: dict[int, str | None] = {}  # item index -> its first category
    for user, item, etype, ts, category in read_events(path):
        idx = vocab.get(item)
        if idx is None:
            if frozen:
                continue
            idx = vocab[item] = len(vocab) + 1
        categories.setdefault(idx, category)
        users.setdefault(user, []).append((idx, etype, ts))
    if not users:
        raise UserError(f"{path}: no events (or none with a known item)")
    sequences = []
    for events in users.values():
        if all(ts is not None for _, _, ts in events):
            events.sort(key=lambda e: e[2])  # type: ignore[arg-type, return-value]
        gaps = [0]
        for (_, _, prev), (_, _, cur) in itertools.pairwise(events):
            gap = None if prev is None or cur is None else cur - prev
            gaps.append(time_gap_bucket(gap, n_time_buckets))
        sequences.append(
            UserSequence(
                items=np.fromiter((e[0] for e in events), np.int64, len(events)),
                types=np.fromiter((e[1] for e in events), np.int64, len(events)),
                gaps=np.asarray(gaps, dtype=np.int64),
            )
        )
    names = list(item_ids) if frozen else [""] * len(vocab)
    if not frozen:
        for s, i in vocab.items():
            names[i - 1] = s
    return Interactions(list(users), names, sequences, _categories(categories, len(names)))


def _categories(first: dict[int, str | None], n_items: int) -> list[str] | None:
    """Each item's category in item order; None unless every item has one."""
    if len(first) != n_items or any(c is None for c in first.values()):
        return None
    return [str(first[i]) for i in range(1, n_items + 1)]


# --------------------------------------------------------------------------------- tensors


def memory_horizon(gamma: float, tol: float = 1e-4) -> int:
    """Events older than this before a window weigh < tol in the decayed memory: dropped."""
    if gamma <= 0:
        return 1
    if gamma >= 1:
        return 10_000
    return max(1, math.ceil(math.log(tol) / math.log(gamma)))


@dataclass
class SequenceBatch:
    """Left-padded model inputs for a set of users (all (N, L) unless said)."""

    items: torch.Tensor
    types: torch.Tensor
    gaps: torch.Tensor
    targets: torch.Tensor  # (N, L) next item per position (0 = no loss), or (N,) one target
    prefix: torch.Tensor  # (N, P) items before the window, left-padded: the memory's past
    users: torch.Tensor  # (N,) user row in Interactions.sequences
    target_types: torch.Tensor  # the event type of each target, shaped as targets

    def __len__(self) -> int:
        return self.items.shape[0]

    def lengths(self) -> torch.Tensor:
        return (self.items != 0).sum(dim=1)

    def select(self, idx: torch.Tensor) -> SequenceBatch:
        return SequenceBatch(
            self.items[idx],
            self.types[idx],
            self.gaps[idx],
            self.targets[idx],
            self.prefix[idx],
            self.users[idx],
            self.target_types[idx],
        )


def inputs_without_types(b: SequenceBatch) -> SequenceBatch:
    """The batch with every input event of the default type (its targets' types kept): what a
    model trained without types sees, and what the worker feeds it."""
    return replace(b, types=torch.full_like(b.types, DEFAULT_EVENT_TYPE))


def _pad_left(rows: list[np.ndarray], width: int) -> torch.Tensor:
    out = np.zeros((len(rows), max(width, 1)), dtype=np.int64)
    for r, a in enumerate(rows):
        a = a[-width:] if width else a[:0]
        if len(a):
            out[r, out.shape[1] - len(a) :] = a
    return torch.from_numpy(out)


def _build(
    inter: Interactions,
    user_rows: list[int],
    end: list[int],
    max_len: int,
    prefix_len: int,
    next_item_targets: bool,
) -> SequenceBatch:
    """Window = events[:end][-max_len:] of each user; prefix = the prefix_len events before it."""
    items, types, gaps, targets, target_types, prefix = [], [], [], [], [], []
    for u, e in zip(user_rows, end, strict=True):
        s = inter.sequences[u]
        start = max(0, e - max_len)
        items.append(s.items[start:e])
        types.append(s.types[start:e])
        gaps.append(s.gaps[start:e])
        prefix.append(s.items[max(0, start - prefix_len) : start])
        if next_item_targets:
            targets.append(s.items[start + 1 : e + 1])
            target_types.append(s.types[start + 1 : e + 1])
    rows = list(zip(user_rows, end, strict=True))
    return SequenceBatch(
        items=_pad_left(items, max_len),
        types=_pad_left(types, max_len),
        gaps=_pad_left(gaps, max_len),
        targets=(
            _pad_left(targets, max_len)
            if next_item_targets
            else torch.as_tensor([int(inter.sequences[u].items[e]) for u, e in rows])
        ),
        prefix=_pad_left(prefix, prefix_len)
        if prefix_len
        else torch.zeros(len(items), 1, dtype=torch.long),
        users=torch.as_tensor(user_rows, dtype=torch.long),
        target_types=(
            _pad_left(target_types, max_len)
            if next_item_targets
            else torch.as_tensor([int(inter.sequences[u].types[e]) for u, e in rows])
        ),
    )


def train_batch(
    inter: Interactions,
    max_len: int,
    prefix_len: int,
    every_window: bool = False,
    held_out: set[int] | None = None,
) -> SequenceBatch:
    """Training examples: each user's events except the last two; target = the next event.

    One window per user (its last max_len training events) unless ``every_window``: then
    histories longer than a window are cut into consecutive windows ending at the last one, so
    every training event is a target exactly once per epoch (more targets than last-window-only
    on long histories), each earlier window getting the memory of the events before it.

    ``held_out``: when given, only these user rows keep their validation event out of training;
    every other user trains on everything but the test event (the validation sample is all that
    needs holding out, and the newest events are the most like the test targets).
    """
    rows, end = [], []
    for u, s in enumerate(inter.sequences):
        n = len(s.items)
        n_train = n - 2 if n >= 3 else n
        if held_out is not None and n >= 3 and u not in held_out:
            n_train = n - 1
        last = n_train - 1  # inputs events[:last], targets events[1:n_train]
        while last >= 1:
            rows.append(u)
            end.append(last)
            if not every_window:
                break
            last -= max_len
    if not rows:
        raise UserError("no user has enough events to train on (need at least 2)")
    return _build(inter, rows, end, max_len, prefix_len, next_item_targets=True)


def training_counts(inter: Interactions) -> np.ndarray:
    """(n_items + 1,) int64 events per item in the training part of the log: each user's
    events but the last two (validation and test) when it has three or more. Index 0 is the
    padding. The popularity baseline, the long-tail split and the popularity penalty all read
    these counts, and the bundle carries them to the worker."""
    counts = np.zeros(inter.n_items + 1, dtype=np.int64)
    for s in inter.sequences:
        n = len(s.items)
        np.add.at(counts, s.items[: n - 2 if n >= 3 else n], 1)
    counts[0] = 0
    return counts


def eval_batch(inter: Interactions, split: str, max_len: int, prefix_len: int) -> SequenceBatch:
    """Leave-one-out: 'valid' predicts the second to last event, 'test' the last one."""
    if split not in ("valid", "test"):
        raise ValueError(split)
    drop = 2 if split == "valid" else 1
    rows = [u for u, s in enumerate(inter.sequences) if len(s.items) >= 3]
    if not rows:
        raise UserError("no user has the 3 events leave-one-out evaluation needs")
    end = [len(inter.sequences[u].items) - drop for u in rows]
    return _build(inter, rows, end, max_len, prefix_len, next_item_targets=False)


def seen_items(
    inter: Interactions,
    users: torch.Tensor,
    split: str,
    exclude_types: frozenset[int] | None = None,
) -> list[np.ndarray]:
    """Items each user interacted with before the evaluation target, excluded from ranking:
    those of an event whose type is in ``exclude_types`` (type indices; None: every type), the
    rule the worker applies to a window (encoder.features.excluded_seen_types)."""
    drop = 2 if split == "valid" else 1
    out = []
    for u in users.tolist():
        s = inter.sequences[u]
        items, types = s.items[: len(s.items) - drop], s.types[: len(s.items) - drop]
        if exclude_types is not None:
            items = items[np.isin(types, list(exclude_types))]
        out.append(np.unique(items))
    return out
