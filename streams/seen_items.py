"""The items each request of a batch excludes from its top-K: the user's window so far.

A request's seen items are its user's window before the batch, then the user's events in the
batch up to and including its own. They grow event by event, so the cost per event does not
depend on the window. All of it is whole-array work over the batch: a numpy assignment or a
lookup call per user costs more Python than the scoring itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from streams.recommend import Request


def request_ranks(requests: Sequence[Request], users: Sequence[str]) -> tuple[np.ndarray, ...]:
    """Per request: its user's position in ``users``, and how many of that user's events in
    the batch come before it."""
    position = {user_id: i for i, user_id in enumerate(users)}
    request_user = np.fromiter(
        (position[r.event.user_id] for r in requests), np.int64, len(requests)
    )
    per_position = np.bincount(request_user, minlength=len(users))
    by_user = np.argsort(request_user, kind="stable")  # each user's requests in order
    rank = np.empty(len(requests), np.int64)
    rank[by_user] = np.arange(len(requests)) - np.repeat(
        np.cumsum(per_position) - per_position, per_position
    )
    return request_user, rank


def seen_matrix(
    prior_items: Sequence[np.ndarray],
    request_user: np.ndarray,
    rank: np.ndarray,
    per_user: Mapping[str, Sequence[int]],
    event_items: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The (requests, seen) matrix of model indices each request excludes (0 = nothing), and
    per request whether the model knows any of its user's items so far (else the user gets
    the popularity fallback).

    ``prior_items[u]``: the model indices of user ``u``'s window before the batch;
    ``request_user`` and ``rank`` as ``request_ranks`` gives them; ``per_user``: each user's
    request indices in order; ``event_items``: each request's event item.
    """
    lengths = np.array([len(prior) for prior in prior_items], np.int64)
    ends = np.cumsum(lengths)
    flat = np.concatenate(prior_items) if len(prior_items) else np.zeros(0, np.int64)
    known_so_far = np.concatenate([[0], np.cumsum(flat > 0)])
    knows_prior = known_so_far[ends] > known_so_far[ends - lengths]
    # A row holds the prior items, then the user's batch items so far.
    prior_length = lengths[request_user]
    width = int((prior_length + rank).max()) + 1 if len(request_user) else 1
    columns = np.arange(width)
    padded = np.append(flat, 0)  # index len(flat): a pad, for columns past a user's prior
    source = np.minimum((ends - lengths)[request_user][:, None] + columns, len(flat))
    exclude = np.where(columns < prior_length[:, None], padded[source], 0)
    exclude[np.arange(len(request_user)), prior_length + rank] = event_items
    known = knows_prior[request_user] | (event_items > 0)
    repeats = (indices for indices in per_user.values() if len(indices) > 1)
    for indices in repeats:  # earlier batch events of the same user, in order
        for later, index in enumerate(indices[1:], start=1):
            exclude[index, prior_length[index] : prior_length[index] + later] = event_items[
                indices[:later]
            ]
            known[index] |= known[indices[later - 1]]
    return exclude, known
