"""StateSlab, the per-user state cache: rows checked out and in, LRU eviction, growth."""

from __future__ import annotations

import numpy as np

from export.runtime import EncoderStates
from streams.state_slab import StateSlab


def template(value: float = 0.0) -> EncoderStates:
    return EncoderStates(
        {
            "memory": np.full((1, 4), value, np.float32),
            "keys_0": np.full((1, 3, 4), value, np.float32),
        },
        np.full((1, 4), value, np.float32),
    )


def items(*indices: int) -> np.ndarray:
    return np.array(indices, np.int64)


def test_a_checked_in_user_is_a_hit_for_its_version_and_signature_only() -> None:
    slab = StateSlab(template(), max_users=4)
    rows = slab.check_out(["a", "b"])
    assert len(set(rows.tolist())) == 2
    slab.check_in(["a", "b"], rows, "v1", [b"a1", b"b1"], [items(1, 2), items(3)])
    assert slab.lookup("a", "v1", b"a1") == rows[0]
    assert slab.lookup("a", "v2", b"a1") is None  # another model
    assert slab.lookup("a", "v1", b"a0") is None  # another window
    assert slab.window_items("b").tolist() == [3]
    hits = slab.hits(["a", "b", "c"], "v1", {"a": b"a1", "b": b"other", "c": b""})
    assert list(hits) == ["a"] and hits["a"].tolist() == [1, 2]


def test_a_checked_out_user_is_no_entry_until_checked_in_and_release_frees_its_row() -> None:
    slab = StateSlab(template(), max_users=2)
    (row,) = slab.check_out(["a"])
    slab.check_in(["a"], np.array([row]), "v", [b"s"], [items()])
    again = slab.check_out(["a"])
    assert again.tolist() == [row]  # its own row
    assert slab.lookup("a", "v", b"s") is None and len(slab) == 0
    slab.release(again)  # the batch failed: the row is free, nothing cached
    assert row in slab.free and len(slab) == 0


def test_the_least_recently_used_user_is_evicted_over_max_users() -> None:
    slab = StateSlab(template(), max_users=2)
    for user in ("a", "b", "c"):
        rows = slab.check_out([user])
        slab.check_in([user], rows, "v", [b"s"], [items()])
    assert len(slab) == 2
    assert slab.lookup("a", "v", b"s") is None
    assert slab.lookup("b", "v", b"s") is not None and slab.lookup("c", "v", b"s") is not None


def test_a_batch_with_more_users_than_rows_grows_the_slab_keeping_the_states() -> None:
    slab = StateSlab(template(), max_users=2)
    rows = slab.check_out(["a", "b"])
    slab.put(rows, template(7.0))  # one state written into every row
    slab.check_in(["a", "b"], rows, "v", [b"a", b"b"], [items(), items()])
    more = slab.check_out(["a", "b", "c", "d"])
    assert len(set(more.tolist())) == 4 and len(slab.states) == 4
    assert more[:2].tolist() == rows.tolist()
    assert (slab.states.arrays["keys_0"][rows] == 7.0).all()
    assert (slab.states.vectors[more[2:]] == 0.0).all()
    slab.check_in(["a", "b", "c", "d"], more, "v", [b""] * 4, [items()] * 4)
    assert len(slab) == 2 and len(slab.free) == 2  # over max_users: rows back to the free list


def test_a_forgotten_users_row_is_zeroed_and_freed_and_others_keep_theirs() -> None:
    slab = StateSlab(template(), max_users=4)
    rows = slab.check_out(["a", "b"])
    slab.put(rows, template(7.0))
    slab.check_in(["a", "b"], rows, "v1", [b"a1", b"b1"], [items(1), items(2)])
    slab.forget(["a", "unknown"])
    assert slab.lookup("a", "v1", b"a1") is None and len(slab) == 1
    row_a, row_b = rows.tolist()
    assert not slab.states.arrays["keys_0"][row_a].any() and not slab.states.vectors[row_a].any()
    assert slab.states.arrays["keys_0"][row_b].all()
    assert row_a in slab.free
