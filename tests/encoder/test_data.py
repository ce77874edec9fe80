"""Loaders for the three formats, their error messages, and the leave-one-out split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import UserError
from encoder.data import eval_batch, load_interactions, parse_timestamp, seen_items, train_batch
from encoder.features import time_gap_bucket


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_sasrec_format(tmp_path: Path) -> None:
    p = _write(tmp_path, "d.txt", "u1 a\nu1 b\nu2 b\nu1 c\n\nu2 d\n")
    inter = load_interactions(p)
    assert inter.user_ids == ["u1", "u2"]
    assert inter.item_ids == ["a", "b", "c", "d"]
    assert inter.sequences[0].items.tolist() == [1, 2, 3]
    assert inter.sequences[1].items.tolist() == [2, 4]
    assert inter.sequences[0].types.tolist() == [0, 0, 0]
    assert inter.sequences[0].gaps.tolist() == [0, 0, 0]  # no time: unknown gap


def test_sasrec_bad_line_names_the_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "d.txt", "u1 a\nu1 b extra\n")
    with pytest.raises(UserError, match=r"d\.txt:2:"):
        load_interactions(p)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_interactions(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="no events"):
        load_interactions(_write(tmp_path, "e.txt", "\n"))


def test_jsonl_sorted_by_time_with_types_and_gaps(tmp_path: Path) -> None:
    events = [
        {"user_id": "u", "item_id": "x", "event_type": "purchase", "timestamp": 5_000},
        {"user_id": "u", "item_id": "y", "event_type": "click", "timestamp": 1_000},
        {"user_id": "u", "item_id": "z", "event_type": "view", "timestamp": "1970-01-01T00:01:05Z"},
    ]
    p = _write(tmp_path, "e.jsonl", "\n".join(json.dumps(e) for e in events) + "\n")
    s = load_interactions(p).sequences[0]
    assert s.items.tolist() == [2, 1, 3]  # y (t=1 s), x (t=5 s), z (t=65 s); ids by appearance
    assert s.types.tolist() == [0, 1, 2]
    assert s.gaps.tolist() == [0, time_gap_bucket(4.0), time_gap_bucket(60.0)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "e.jsonl:2:"),
        ('{"user_id": "u", "timestamp": 1}', "e.jsonl:2: missing field 'item_id'"),
        ('{"user_id": "u", "item_id": "i", "event_type": "like", "timestamp": 1}', "e.jsonl:2:"),
        ('{"user_id": "u", "item_id": "i", "timestamp": "yesterday"}', "e.jsonl:2:"),
    ],
)
def test_jsonl_bad_lines(tmp_path: Path, line: str, message: str) -> None:
    good = '{"user_id": "u", "item_id": "i", "timestamp": 1}'
    p = _write(tmp_path, "e.jsonl", good + "\n" + line + "\n")
    with pytest.raises(UserError, match=message):
        load_interactions(p)


def test_csv(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "e.csv",
        "user,item,type,timestamp\nu,a,click,2000\nu,b,add_to_cart,1000\nv,a,purchase,3000\n",
    )
    inter = load_interactions(p)
    assert inter.sequences[0].items.tolist() == [2, 1]
    assert inter.sequences[0].types.tolist() == [3, 0]
    assert inter.sequences[1].types.tolist() == [1]


def test_csv_bad_row_and_header(tmp_path: Path) -> None:
    p = _write(tmp_path, "e.csv", "user,item,type,timestamp\nu,a,click,1\nu,b,zap,2\n")
    with pytest.raises(UserError, match=r"e\.csv:3:"):
        load_interactions(p)
    with pytest.raises(UserError, match="header"):
        load_interactions(_write(tmp_path, "h.csv", "who,what\nu,a\n"))


def test_parse_timestamp() -> None:
    assert parse_timestamp(1500) == 1.5
    assert parse_timestamp("1500") == 1.5
    assert parse_timestamp("1970-01-01T00:00:02+00:00") == 2.0
    with pytest.raises(ValueError):
        parse_timestamp(True)


def test_frozen_vocab_drops_unknown_items(tmp_path: Path) -> None:
    p = _write(tmp_path, "d.txt", "u a\nu q\nu b\n")
    inter = load_interactions(p, item_ids=["b", "a"])
    assert inter.sequences[0].items.tolist() == [2, 1]


def test_leave_one_out_split(tmp_path: Path) -> None:
    # u: 1..6 ; v: 3 events ; w: 2 events (train only)
    lines = [f"u {i}" for i in range(1, 7)] + ["v 7", "v 8", "v 9", "w 1", "w 2"]
    inter = load_interactions(_write(tmp_path, "d.txt", "\n".join(lines) + "\n"))
    tr = train_batch(inter, max_len=3, prefix_len=2)
    # u trains on events 1..4 (5 = valid, 6 = test): inputs [1,2,3] -> targets [2,3,4], window 3
    u = tr.users.tolist().index(0)
    assert tr.items[u].tolist() == [1, 2, 3]
    assert tr.targets[u].tolist() == [2, 3, 4]
    w = tr.users.tolist().index(2)
    assert tr.items[w].tolist() == [0, 0, 1]
    assert tr.targets[w].tolist() == [0, 0, 2]
    va = eval_batch(inter, "valid", max_len=3, prefix_len=2)
    te = eval_batch(inter, "test", max_len=3, prefix_len=2)
    assert va.users.tolist() == [0, 1] == te.users.tolist()  # w has < 3 events
    assert va.items[0].tolist() == [2, 3, 4] and int(va.targets[0]) == 5
    assert va.prefix[0].tolist() == [0, 1]  # the memory's past before the window
    assert te.items[0].tolist() == [3, 4, 5] and int(te.targets[0]) == 6
    assert te.prefix[0].tolist() == [1, 2]
    assert seen_items(inter, te.users, "test")[0].tolist() == [1, 2, 3, 4, 5]
    assert seen_items(inter, va.users, "valid")[1].tolist() == [7]


def test_held_out_users_alone_keep_their_validation_event_out_of_training(
    tmp_path: Path,
) -> None:
    # u and v: events 1..5 (4 = valid, 5 = test); w: 2 events (train only)
    lines = [f"u {i}" for i in range(1, 6)] + [f"v {i}" for i in range(1, 6)] + ["w 1", "w 2"]
    inter = load_interactions(_write(tmp_path, "d.txt", "\n".join(lines) + "\n"))
    tr = train_batch(inter, max_len=4, prefix_len=2, held_out={1})
    targets = {int(u): tr.targets[r].tolist() for r, u in enumerate(tr.users)}
    assert targets[0] == [0, 2, 3, 4]  # u is outside the sample: its validation event 4 trains
    assert targets[1] == [0, 0, 2, 3]  # v is in the validation sample: 4 stays held out
    assert targets[2] == [0, 0, 0, 2]  # w has no validation event: unchanged
    assert all(5 not in t for t in targets.values())  # no test event ever trains


def test_every_window_makes_each_training_event_a_target_once(tmp_path: Path) -> None:
    # u: events 1..10, trains on 1..8 (9 = valid, 10 = test); windows of 3 inputs
    lines = [f"u {i}" for i in range(1, 11)] + ["v 1", "v 2"]
    inter = load_interactions(_write(tmp_path, "d.txt", "\n".join(lines) + "\n"))
    last_only = train_batch(inter, max_len=3, prefix_len=2)
    every = train_batch(inter, max_len=3, prefix_len=2, every_window=True)
    assert len(last_only) == 2 and len(every) == 4  # u: 3 windows, v: 1
    rows = [r for r in range(len(every)) if int(every.users[r]) == 0]
    got = sorted((every.items[r].tolist(), every.targets[r].tolist()) for r in rows)
    assert got == [
        ([0, 0, 1], [0, 0, 2]),  # the first event is never a target: it has no past
        ([2, 3, 4], [3, 4, 5]),
        ([5, 6, 7], [6, 7, 8]),
    ]
    middle = rows[[every.items[r].tolist() for r in rows].index([2, 3, 4])]
    assert every.prefix[middle].tolist() == [0, 1]  # the memory's past of an earlier window
    targets = every.targets[every.users == 0]
    assert sorted(targets[targets != 0].tolist()) == list(range(2, 9))


DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.data
def test_ml1m_counts_and_split() -> None:
    path = DATA_DIR / "ml-1m.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found (data is not committed; see ../shared/data)")
    inter = load_interactions(path)
    assert (len(inter.user_ids), inter.n_items, inter.n_events) == (6040, 3416, 999_611)
    te = eval_batch(inter, "test", max_len=200, prefix_len=0)
    assert len(te) == 6040 and te.items.shape == (6040, 200)
