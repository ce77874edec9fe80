"""The seen-items matrix of a batch against a plain per-request reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from streams.events import Event, Source
from streams.recommend import Request
from streams.seen_items import request_ranks, seen_matrix

# model indices: -1 an item the model does not know, 1.. known items
item_index = st.integers(-1, 9).filter(lambda i: i != 0)


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[np.ndarray], list[int], list[int]]:
    """Each user's prior window items, and the batch as (user position, event item) in order."""
    n_users = draw(st.integers(1, 5))
    priors = [np.array(draw(st.lists(item_index, max_size=6)), np.int64) for _ in range(n_users)]
    # every user has at least one event; the rest interleave at random
    order = list(range(n_users)) + draw(st.lists(st.integers(0, n_users - 1), max_size=12))
    order = draw(st.permutations(order))
    items = [draw(item_index) for _ in order]
    return priors, order, items


@given(batches())
def test_each_row_is_the_window_before_then_the_batch_so_far(
    batch: tuple[list[np.ndarray], list[int], list[int]],
) -> None:
    priors, order, items = batch
    # users in order of their first request, as the recommender lists them
    users = [f"u{p}" for p in dict.fromkeys(order)]
    prior_items = [priors[int(user[1:])] for user in users]
    requests = [
        Request(Event(f"e{i}", f"u{p}", "x", "click", i, Source("t", 0, i)), ())
        for i, p in enumerate(order)
    ]
    per_user: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        per_user.setdefault(request.event.user_id, []).append(index)
    event_items = np.array(items, np.int64)

    request_user, rank = request_ranks(requests, users)
    exclude, known = seen_matrix(prior_items, request_user, rank, per_user, event_items)

    assert exclude.shape[0] == len(requests)
    for index, request in enumerate(requests):
        user = request.event.user_id
        so_far = [items[i] for i in per_user[user] if i <= index]
        seen = [*priors[int(user[1:])].tolist(), *so_far]
        assert users[request_user[index]] == user
        assert rank[index] == len(so_far) - 1
        assert exclude[index].tolist() == seen + [0] * (exclude.shape[1] - len(seen))
        assert known[index] == any(i > 0 for i in seen)
