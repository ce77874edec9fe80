"""The long-tail split, the popularity penalty and the training counts they read: pure logic
shared by the report and the worker, so it is pinned here once."""

from __future__ import annotations

import numpy as np
import pytest

from encoder.popularity import checked_penalty, counts_from_vocab, long_tail, popularity_bias


def test_the_head_is_the_most_trained_fifth_ties_to_the_lower_index() -> None:
    counts = np.array([0, 5, 9, 9, 1, 0, 3, 9, 2, 4, 7])  # 10 items: head = 2 of them
    tail = long_tail(counts)
    assert not tail[0], "the padding is neither head nor tail"
    assert np.flatnonzero(~tail[1:]).tolist() == [1, 2]  # items 2 and 3 (9 each, lowest index)
    assert long_tail(counts, head_share=0.0)[1:].all()
    assert not long_tail(counts, head_share=1.0)[1:].any()
    assert (~long_tail(np.zeros(12, np.int64))[1:]).sum() == 3  # ceil(0.2 * 11)


def test_the_penalty_lowers_popular_items_by_the_log_of_their_count() -> None:
    counts = np.array([0, 0, 9, 99])
    assert popularity_bias(counts, 0.0).tolist() == [0.0, 0.0, 0.0, 0.0]
    bias = popularity_bias(counts, 0.5)
    assert bias.dtype == np.float32 and bias[0] == 0.0 and bias[1] == 0.0
    np.testing.assert_allclose(bias[2:], [-0.5 * np.log(10), -0.5 * np.log(100)], rtol=1e-6)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "1"])
def test_a_bad_penalty_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="penalty"):
        checked_penalty(bad)  # type: ignore[arg-type]


def test_counts_are_read_from_vocab_or_refused() -> None:
    assert counts_from_vocab({"items": ["a", "b"]}, 2) is None
    assert counts_from_vocab({"item_counts": [3, 0]}, 2).tolist() == [0, 3, 0]
    for bad in ([1], [1, -1], [1, 1.5], [True, 1], "12"):
        with pytest.raises(ValueError, match="item_counts"):
            counts_from_vocab({"item_counts": bad}, 2)
