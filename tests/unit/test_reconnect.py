"""The agent's reconnect pacing: backoff, but never past the lease its tasks hang on."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from planetary_mesh.agent.daemon import RECONNECT_MAX, RECONNECT_MIN, reconnect_wait


def test_with_no_task_running_the_backoff_is_kept() -> None:
    assert reconnect_wait(RECONNECT_MAX, None) == RECONNECT_MAX
    assert reconnect_wait(1.6, -0.5) == 1.6  # lease already gone: nothing left to save


def test_a_long_backoff_is_cut_to_half_of_the_lease_left() -> None:
    # The failure seen: lease 3 s, coordinator back after 1.5 s, next try due 1.6 s later.
    assert reconnect_wait(1.6, 1.5) == 0.75


def test_near_the_end_of_the_lease_tries_come_no_faster_than_the_minimum() -> None:
    assert reconnect_wait(1.6, 0.1) == RECONNECT_MIN


@given(
    backoff=st.floats(RECONNECT_MIN, RECONNECT_MAX),
    left=st.floats(RECONNECT_MIN * 2, 60.0),
)
def test_the_next_try_comes_before_the_lease_runs_out(backoff: float, left: float) -> None:
    wait = reconnect_wait(backoff, left)
    assert RECONNECT_MIN <= wait <= backoff
    assert wait < left
