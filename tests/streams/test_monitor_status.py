"""The partition status rules of streams/monitor/status.py, one case per rule."""

from __future__ import annotations

from streams.monitor.status import Sample, evaluate, worst

WINDOW = 4


def samples(*offsets: tuple[int | None, int | None]) -> list[Sample]:
    """(committed, end) readings one second apart."""
    return [Sample(1_000 * i, committed, end) for i, (committed, end) in enumerate(offsets)]


def test_err_when_the_end_is_unknown_or_the_commit_is_past_it() -> None:
    assert evaluate(samples((5, None)), WINDOW, 1).status == "ERR"
    assert evaluate(samples((9, 5)), WINDOW, 1).status == "ERR"
    assert evaluate([], WINDOW, 1).status == "ERR"


def test_ok_when_the_lag_reached_zero_or_the_window_is_young() -> None:
    assert evaluate(samples((5, 9), (9, 9), (9, 12), (9, 15)), WINDOW, 1).status == "OK"
    assert evaluate(samples((5, 9), (5, 9)), WINDOW, 1).status == "OK"


def test_a_standing_offset_with_lag_is_a_stall_while_a_worker_owns_it() -> None:
    stuck = samples((5, 9), (5, 9), (5, 10), (5, 12))
    assert evaluate(stuck, WINDOW, members=2).status == "STALL"
    assert evaluate(stuck, WINDOW, members=0).status == "STOP"


def test_without_members_a_long_standstill_is_a_stop() -> None:
    standing = samples(*[(5, 9)] * (WINDOW * 3))
    assert evaluate(standing[:WINDOW], WINDOW, members=None).status == "STALL"
    verdict = evaluate(standing, WINDOW, members=None)
    assert verdict.status == "STOP" and "windows" in verdict.reason


def test_moving_but_falling_behind_is_a_warning_and_catching_up_is_ok() -> None:
    behind = samples((1, 10), (2, 20), (3, 30), (4, 40))
    assert evaluate(behind, WINDOW, 1).status == "WARN"
    catching_up = samples((1, 40), (20, 41), (30, 42), (40, 43))
    assert evaluate(catching_up, WINDOW, 1).status == "OK"
    steady = samples((1, 10), (11, 20), (21, 30), (31, 40))  # constant lag, moving
    assert evaluate(steady, WINDOW, 1).status == "OK"


def test_a_group_is_as_bad_as_its_worst_partition() -> None:
    assert worst(["OK", "WARN", "OK"]) == "WARN"
    assert worst(["STALL", "ERR", "STOP"]) == "ERR"
    assert worst([]) == "OK"
