"""The items each request of a batch excludes from its top-K: the user's window so far.

A request's seen items are its user's window before the batch, then the user's events in the
batch up to and including its own. They grow event by event, so the cost per event does not
depend on the window. All of it is whole-array work over the batch: a numpy assignment or a
lookup call per user costs more Python than the scoring itself.

Which seen items are excluded is a rule by event type (INTEREST_EXCLUDE_SEEN_TYPES): an item
is excluded when the user has an event of one of those types on it; an item only viewed may
come back when views are not in the rule (a shop re-shows what a user looked at; a film
watched is not shown again). ``interest evaluate`` ranks under the same rule
(encoder.data.seen_items). Every type, the default, needs no look at the types at all; any
other rule reads the types of the users' windows, once per batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np

from streams.recommend import Request
from streams.window import WindowEntry


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
    excluded_prior: Sequence[np.ndarray] | None = None,
    event_excluded: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The (requests, seen) matrix of model indices each request excludes (0 = nothing), and
    per request whether the model knows any of its user's items so far (else the user gets
    the popularity fallback).

    ``prior_items[u]``: the model indices of user ``u``'s window before the batch;
    ``request_user`` and ``rank`` as ``request_ranks`` gives them; ``per_user``: each user's
    request indices in order; ``event_items``: each request's event item. Under a rule by
    type (``typed_exclusion``): ``excluded_prior[u]``, the prior items to exclude (default: all
    of ``prior_items[u]``), and ``event_excluded``, whether each request's event item is
    (default: all).
    """
    known = _knows_prior(prior_items)[request_user] | (event_items > 0)
    shown = prior_items if excluded_prior is None else excluded_prior
    batch_items = (
        event_items if event_excluded is None else np.where(event_excluded, event_items, 0)
    )
    lengths = np.array([len(prior) for prior in shown], np.int64)
    ends = np.cumsum(lengths)
    flat = np.concatenate(shown) if len(shown) else np.zeros(0, np.int64)
    # A row holds the prior items, then the user's batch items so far.
    prior_length = lengths[request_user]
    width = int((prior_length + rank).max()) + 1 if len(request_user) else 1
    columns = np.arange(width)
    padded = np.append(flat, 0)  # index len(flat): a pad, for columns past a user's prior
    source = np.minimum((ends - lengths)[request_user][:, None] + columns, len(flat))
    exclude = np.where(columns < prior_length[:, None], padded[source], 0)
    exclude[np.arange(len(request_user)), prior_length + rank] = batch_items
    repeats = (indices for indices in per_user.values() if len(indices) > 1)
    for indices in repeats:  # earlier batch events of the same user, in order
        for later, index in enumerate(indices[1:], start=1):
            exclude[index, prior_length[index] : prior_length[index] + later] = batch_items[
                indices[:later]
            ]
            known[index] |= known[indices[later - 1]]
    return exclude, known


def _knows_prior(prior_items: Sequence[np.ndarray]) -> np.ndarray:
    """Per user: whether its window before the batch holds an item the model knows."""
    lengths = np.array([len(prior) for prior in prior_items], np.int64)
    ends = np.cumsum(lengths)
    flat = np.concatenate(prior_items) if len(prior_items) else np.zeros(0, np.int64)
    known_so_far = np.concatenate([[0], np.cumsum(flat > 0)])
    return known_so_far[ends] > known_so_far[ends - lengths]


def typed_exclusion(
    requests: Sequence[Request],
    prior_windows: Sequence[Sequence[WindowEntry]],
    types: Collection[str],
    index_of: Callable[[list[str]], np.ndarray],
) -> tuple[list[np.ndarray], np.ndarray]:
    """``seen_matrix``'s ``excluded_prior`` and ``event_excluded`` under the rule ``types``:
    per user (``prior_windows`` in ``users`` order), the model indices of its prior window's
    events of those types; per request, whether its event is of one. One ``index_of`` call
    for the batch."""
    picked = [[e.item_id for e in window if e.event_type in types] for window in prior_windows]
    mapped = index_of([item for items in picked for item in items])
    bounds = np.cumsum([0, *(len(items) for items in picked)])
    excluded_prior = [mapped[start:end] for start, end in itertools.pairwise(bounds)]
    event_excluded = np.fromiter(
        (r.event.event_type in types for r in requests), bool, len(requests)
    )
    return excluded_prior, event_excluded
