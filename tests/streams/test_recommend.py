"""Recommendation ids: the fast formatting equals the plain uuid definition."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from streams.recommend import recommendation_id, recommendation_id_reference


@given(st.text(), st.text())
def test_recommendation_id_matches_the_reference(event_id: str, version: str) -> None:
    fast = recommendation_id(event_id, version)
    assert fast == recommendation_id_reference(event_id, version)
    parsed = uuid.UUID(fast)
    assert parsed.version == 5 and parsed.variant == uuid.RFC_4122


def test_recommendation_id_is_stable_across_releases() -> None:
    # Consumers dedupe replays by this id: the same event and model must keep the same id.
    assert recommendation_id("ev-1", "abc123") == "55363d68-5e6b-5bea-ae4d-2078cb2183f5"
    assert recommendation_id("ev-1", "abc123") != recommendation_id("ev-2", "abc123")
