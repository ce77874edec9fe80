"""The in-place attention kernel against its plain numpy reference, over random shapes (batch,
heads, cache slots, head width), ring positions, partly filled caches and slab rows taken in
any order with gaps between them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from encoder.model import NEG_INF
from export.slab_attention import attend_in_place, attend_reference


@dataclass(frozen=True)
class Case:
    query: np.ndarray  # (B, H, w)
    key: np.ndarray
    value: np.ndarray
    keys: np.ndarray  # (N, H, slots, w)
    values: np.ndarray
    rows: np.ndarray  # (B,) distinct slab rows
    ring: np.ndarray  # (N,) oldest slot per slab row
    bias_by_age: np.ndarray  # (slots + 1, H)

    def reference(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(out, keys after, values after) by the plain reference."""
        return attend_reference(
            self.query,
            self.key,
            self.value,
            self.keys,
            self.values,
            self.rows,
            self.ring,
            self.bias_by_age,
        )

    def in_place(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(out, keys, values, ring) after the kernel, run on copies of the case's arrays."""
        keys, values, ring = self.keys.copy(), self.values.copy(), self.ring.copy()
        out = np.full_like(self.query, np.nan)
        attend_in_place(
            self.query, self.key, self.value, keys, values, self.rows, ring, self.bias_by_age, out
        )
        return out, keys, values, ring


def _case(
    batch: int,
    heads: int,
    slots: int,
    head_dim: int,
    rows: list[int],
    ring: list[int],
    filled: list[int],
    seed: int,
) -> Case:
    """Arrays laid out as the bundle lays them out: the keys' last column is the mask (0 for
    an event, NEG_INF for an empty slot), the query carries 1 there; the values carry 1."""
    rng = np.random.default_rng(seed)
    n, width = len(ring), head_dim + 1

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(size=shape).astype(np.float32)

    query, key, value = (
        normal(batch, heads, width),
        normal(batch, heads, width),
        normal(batch, heads, width),
    )
    query[..., -1], key[..., -1], value[..., -1] = 1.0, 0.0, 1.0
    keys, values = normal(n, heads, slots, width), normal(n, heads, slots, width)
    ring_a = np.array(ring, np.int64)
    age = slots - (np.arange(slots)[None, :] - ring_a[:, None]) % slots  # (N, slots): 1..slots
    empty = age > np.array(filled)[:, None]  # the newest filled[r] events are cached
    keys[..., -1] = np.where(empty, NEG_INF, 0.0)[:, None, :]
    values[..., -1] = 1.0
    return Case(
        query, key, value, keys, values, np.array(rows, np.int64), ring_a, normal(slots + 1, heads)
    )


@st.composite
def cases(draw: st.DrawFn) -> Case:
    batch = draw(st.integers(1, 6))
    heads = draw(st.integers(1, 4))
    slots = draw(st.integers(1, 9))  # span - 1
    head_dim = draw(st.integers(1, 8))
    n = draw(st.integers(batch, batch + 6))  # slab rows; the others must stay untouched
    rows = draw(st.permutations(range(n)))[:batch]
    ring = draw(st.lists(st.integers(0, slots - 1), min_size=n, max_size=n))
    filled = draw(st.lists(st.integers(0, slots), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**32 - 1))
    return _case(batch, heads, slots, head_dim, rows, ring, filled, seed)


def _check(case: Case) -> None:
    want, want_keys, want_values = case.reference()
    out, keys, values, ring = case.in_place()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(keys, want_keys)  # new slots at the ring, nothing else
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(ring, case.ring)  # the caller moves the ring


@settings(max_examples=300, deadline=None)
@given(cases())
def test_kernel_matches_plain_reference(case: Case) -> None:
    _check(case)


def test_empty_cache_attends_to_the_event_alone() -> None:
    """No cached event: the output is the event's own value, whatever the bias."""
    case = _case(2, 2, 4, 3, rows=[3, 0], ring=[1, 0, 2, 3], filled=[0, 0, 0, 0], seed=1)
    _check(case)
    out, *_ = case.in_place()
    np.testing.assert_allclose(out, case.value, rtol=1e-6, atol=1e-6)


def test_reference_changes_nothing_it_is_given() -> None:
    case = _case(3, 2, 5, 4, rows=[4, 1, 2], ring=[0, 4, 2, 1, 3], filled=[5, 2, 0, 5, 1], seed=2)
    before = [a.copy() for a in (case.keys, case.values, case.ring)]
    case.reference()
    for a, b in zip((case.keys, case.values, case.ring), before, strict=True):
        np.testing.assert_array_equal(a, b)
