"""`make demo` (`interest demo`): the main job on the embedded default, end to end."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="the demo trains its small model with the training extra")

from streams.demo import run_demo


def test_demo_trains_serves_and_prints_a_recommendation_per_event(
    capsys: pytest.CaptureFixture[str],
) -> None:
    received = run_demo(users=4, events_per_user=3, show=12)
    assert received == 12
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 12
    assert all(" <- " in line for line in lines)
    assert any("[encoder]" in line for line in lines)  # the trained model, not only popularity
