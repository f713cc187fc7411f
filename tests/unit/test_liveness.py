"""Liveness rules: when a node is suspect or lost, how the heartbeat interval stretches with the
mesh, and the retry backoff. Pure functions, so the clock is a plain float."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from planetary_mesh.core.liveness import (
    LivenessChange,
    LivenessPolicy,
    NodeLiveness,
    liveness_changes,
    retry_backoff,
)
from planetary_mesh.core.states import NodeState

READY, SUSPECT, LOST = NodeState.READY, NodeState.SUSPECT, NodeState.LOST
POLICY = LivenessPolicy()  # 1 s beats, suspect after 3 missed, lost after 5 s / 0.5 s
T0 = 1000.0  # when the node was last heard (or its session closed)


def closed(state: NodeState = SUSPECT, *, not_lost_before: float = 0.0) -> NodeLiveness:
    return NodeLiveness(
        "n-a", state, connected=False, last_heard=T0, not_lost_before=not_lost_before
    )


def silent(state: NodeState = READY, *, not_lost_before: float = 0.0) -> NodeLiveness:
    return NodeLiveness(
        "n-a", state, connected=True, last_heard=T0, not_lost_before=not_lost_before
    )


def change_of(node: NodeLiveness, now: float, policy: LivenessPolicy = POLICY) -> NodeState | None:
    """The state ``node`` alone moves to at ``now``, or None when it stays as it is."""
    changes = liveness_changes([node], now, policy)
    assert len(changes) <= 1
    assert all(c.node_id == node.node_id and c.reason for c in changes)
    return changes[0].state if changes else None


# -- the defaults the issue asks for ------------------------------------------------------------


def test_the_defaults_are_the_documented_ones() -> None:
    assert POLICY.heartbeat_interval == 1.0
    assert POLICY.lost_after_disconnect == 0.5
    assert POLICY.lost_after_silence == 4.0
    assert POLICY.silence_limits(1) == (3.0, 4.0)
    assert POLICY.lease(1) == 3.0  # one beat before the node would be declared lost


# -- a closed session ---------------------------------------------------------------------------


def test_a_closed_session_is_suspect_at_once() -> None:
    # The node was still READY in the view: the very same instant makes it suspect.
    assert change_of(closed(READY), T0) is SUSPECT


def test_a_closed_session_is_lost_exactly_at_the_grace_and_not_before() -> None:
    assert change_of(closed(), T0 + 0.25) is None  # already suspect: nothing new to say
    assert change_of(closed(), T0 + 0.4999) is None
    assert change_of(closed(), T0 + 0.5) is LOST
    assert change_of(closed(), T0 + 0.5001) is LOST
    assert change_of(closed(), T0 + 3600) is LOST


def test_a_ready_node_whose_session_closed_long_ago_goes_straight_to_lost() -> None:
    assert change_of(closed(READY), T0 + 1.0) is LOST


def test_the_disconnect_grace_is_configurable() -> None:
    policy = LivenessPolicy(lost_after_disconnect=2.0)
    assert change_of(closed(), T0 + 1.999, policy) is None
    assert change_of(closed(), T0 + 2.0, policy) is LOST


def test_the_reason_says_the_session_closed() -> None:
    (change,) = liveness_changes([closed(READY)], T0, POLICY)
    assert change == LivenessChange("n-a", SUSPECT, "session closed")
    (lost,) = liveness_changes([closed()], T0 + 0.5, POLICY)
    assert "session closed" in lost.reason


# -- a connected but silent node ----------------------------------------------------------------


@pytest.mark.parametrize("quiet", [0.0, 0.5, 1.0, 2.0, 2.999])
def test_a_node_heard_recently_does_not_change(quiet: float) -> None:
    assert change_of(silent(), T0 + quiet) is None


def test_a_silent_node_is_suspect_after_the_missed_beats() -> None:
    assert change_of(silent(), T0 + 2.999) is None
    assert change_of(silent(), T0 + 3.0) is SUSPECT  # 3 missed beats of 1 s
    assert change_of(silent(), T0 + 3.9) is SUSPECT


def test_a_silent_node_already_suspect_is_not_reported_again() -> None:
    assert change_of(silent(SUSPECT), T0 + 3.0) is None
    assert change_of(silent(SUSPECT), T0 + 3.999) is None


def test_a_silent_node_is_lost_after_the_silence_grace() -> None:
    assert change_of(silent(SUSPECT), T0 + 4.0) is LOST
    # Straight from ready too: a check that comes late does not need the suspect step first.
    assert change_of(silent(READY), T0 + 4.0) is LOST
    assert change_of(silent(READY), T0 + 60.0) is LOST


def test_silence_reasons_say_how_long() -> None:
    (suspect,) = liveness_changes([silent()], T0 + 3.0, POLICY)
    assert suspect.state is SUSPECT and "silent for 3.0s" in suspect.reason
    (lost,) = liveness_changes([silent()], T0 + 4.0, POLICY)
    assert lost.state is LOST and "silent for 4.0s" in lost.reason


def test_silence_limits_follow_the_policy() -> None:
    policy = LivenessPolicy(heartbeat_interval=2.0, suspect_after_missed=2.0, lost_after_silence=9)
    assert policy.silence_limits(1) == (4.0, 9.0)
    assert change_of(silent(), T0 + 3.999, policy) is None
    assert change_of(silent(), T0 + 4.0, policy) is SUSPECT
    assert change_of(silent(SUSPECT), T0 + 8.999, policy) is None
    assert change_of(silent(SUSPECT), T0 + 9.0, policy) is LOST


def test_lost_comes_at_least_one_beat_after_suspect() -> None:
    # A lost limit configured below the suspect one is pushed past it: suspect always comes first.
    policy = LivenessPolicy(lost_after_silence=1.0)
    assert policy.silence_limits(1) == (3.0, 4.0)
    assert change_of(silent(), T0 + 3.0, policy) is SUSPECT
    assert change_of(silent(SUSPECT), T0 + 3.999, policy) is None
    assert change_of(silent(SUSPECT), T0 + 4.0, policy) is LOST


# -- lost is final; the restart grace -----------------------------------------------------------


@pytest.mark.parametrize("connected", [True, False])
@pytest.mark.parametrize("quiet", [0.0, 0.5, 3.0, 5.0, 1e6])
def test_a_lost_node_is_never_changed_again(connected: bool, quiet: float) -> None:
    node = NodeLiveness("n-a", LOST, connected=connected, last_heard=T0)
    assert liveness_changes([node], T0 + quiet, POLICY) == []


def test_not_lost_before_protects_a_disconnected_node_until_then() -> None:
    grace_end = T0 + POLICY.restart_grace
    node = closed(not_lost_before=grace_end)
    for now in (T0, T0 + 0.5, T0 + 5.0, grace_end - 0.001):
        assert change_of(node, now) is None, now
    # Still not back when the grace ends: lost right away.
    assert change_of(node, grace_end) is LOST


def test_not_lost_before_protects_a_silent_node_too() -> None:
    node = silent(not_lost_before=T0 + 20.0)
    assert change_of(node, T0 + 19.999) is None
    assert change_of(node, T0 + 20.0) is LOST


def test_not_lost_before_in_the_past_changes_nothing() -> None:
    assert change_of(closed(not_lost_before=T0 - 1), T0 + 0.5) is LOST
    assert change_of(silent(not_lost_before=T0), T0 + 3.0) is SUSPECT


def test_each_node_is_judged_on_its_own() -> None:
    now = T0 + 3.5
    nodes = [
        NodeLiveness("fresh", READY, True, now - 0.1),
        NodeLiveness("quiet", READY, True, T0),
        NodeLiveness("gone", SUSPECT, False, T0),
        NodeLiveness("just-closed", READY, False, now),
        NodeLiveness("dead", LOST, False, T0 - 100),
        NodeLiveness("owed", SUSPECT, False, T0, not_lost_before=now + 1),
    ]
    changes = {c.node_id: c.state for c in liveness_changes(nodes, now, POLICY)}
    assert changes == {"quiet": SUSPECT, "gone": LOST, "just-closed": SUSPECT}


# -- stretching the heartbeat interval with the mesh --------------------------------------------


def test_the_interval_stays_at_the_base_while_the_cap_is_not_reached() -> None:
    assert POLICY.interval(0) == 1.0
    assert POLICY.interval(1) == 1.0
    assert POLICY.interval(500) == 1.0  # 500 nodes x 1/s is exactly the cap


def test_the_interval_stretches_past_the_cap() -> None:
    assert POLICY.interval(501) == pytest.approx(501 / 500)
    assert POLICY.interval(1000) == 2.0
    assert POLICY.interval(5000) == 10.0


def test_silence_limits_and_the_lease_stretch_with_the_interval() -> None:
    assert POLICY.silence_limits(1000) == (6.0, 8.0)  # 3 beats of 2 s; one beat more to lose
    assert POLICY.lease(1000) == 6.0
    assert POLICY.silence_limits(5000) == (30.0, 40.0)
    assert POLICY.lease(5000) == 30.0


def test_a_big_mesh_judges_silence_by_its_stretched_interval() -> None:
    # 1000 nodes beat every 2 s: a node quiet for 5 s has missed only 2.5 beats.
    nodes = [NodeLiveness(f"n-{i}", READY, True, T0 + 100) for i in range(999)]
    nodes.append(NodeLiveness("quiet", READY, True, T0))
    assert liveness_changes(nodes, T0 + 5.0, POLICY) == []
    (change,) = liveness_changes(nodes, T0 + 6.0, POLICY)
    assert (change.node_id, change.state) == ("quiet", SUSPECT)
    (change,) = liveness_changes(nodes, T0 + 8.0, POLICY)
    assert (change.node_id, change.state) == ("quiet", LOST)


policies = st.builds(
    LivenessPolicy,
    heartbeat_interval=st.floats(0.01, 60),
    max_cluster_heartbeats=st.floats(0.01, 1e5),
    suspect_after_missed=st.floats(1, 10),
    lost_after_silence=st.floats(0.1, 600),
    lost_after_disconnect=st.floats(0.01, 60),
    restart_grace=st.floats(0, 600),
)


@given(policy=policies, nodes=st.integers(0, 1_000_000))
def test_the_cluster_heartbeat_rate_never_exceeds_the_cap(
    policy: LivenessPolicy, nodes: int
) -> None:
    interval = policy.interval(nodes)
    assert interval >= policy.heartbeat_interval
    # nodes / (nodes / cap) may round one ulp above the cap; nothing more.
    assert nodes / interval <= policy.max_cluster_heartbeats * (1 + 1e-12)
    # The interval stretches only as much as it must: at the base rate or at the cap.
    assert interval == policy.heartbeat_interval or interval == pytest.approx(
        nodes / policy.max_cluster_heartbeats
    )


@given(policy=policies, nodes=st.integers(0, 100_000), more=st.integers(0, 100_000))
def test_intervals_and_limits_never_shrink_as_the_mesh_grows(
    policy: LivenessPolicy, nodes: int, more: int
) -> None:
    assert policy.interval(nodes + more) >= policy.interval(nodes)
    small, big = policy.silence_limits(nodes), policy.silence_limits(nodes + more)
    assert big[0] >= small[0] and big[1] >= small[1]
    suspect, lost = small
    interval = policy.interval(nodes)
    assert suspect == policy.suspect_after_missed * interval
    assert lost >= suspect + interval  # suspect always comes before lost
    assert lost >= policy.lost_after_silence
    assert policy.lease(nodes) == lost - interval  # the agent stops its copy first


@given(policy=policies, nodes=st.integers(1, 2_000), quiet=st.floats(0, 1e4))
def test_a_silent_node_follows_the_stretched_limits(
    policy: LivenessPolicy, nodes: int, quiet: float
) -> None:
    # Heard at 0.0 so that ``now - last_heard`` is exactly ``quiet``, with no rounding.
    views = [NodeLiveness(f"n-{i}", READY, True, quiet) for i in range(nodes - 1)]
    views.append(NodeLiveness("quiet", READY, True, 0.0))
    suspect_after, lost_after = policy.silence_limits(nodes)
    changes = {c.node_id: c.state for c in liveness_changes(views, quiet, policy)}
    expected = LOST if quiet >= lost_after else SUSPECT if quiet >= suspect_after else None
    assert changes.get("quiet") is expected
    assert set(changes) <= {"quiet"}


# -- retry backoff ------------------------------------------------------------------------------


def test_no_failure_means_no_wait() -> None:
    assert retry_backoff(0, 1.0, 60.0) == 0.0
    assert retry_backoff(-3, 1.0, 60.0) == 0.0


def test_the_backoff_doubles_from_the_base() -> None:
    assert [retry_backoff(n, 1.0, 60.0) for n in range(1, 7)] == [1, 2, 4, 8, 16, 32]
    assert [retry_backoff(n, 0.25, 60.0) for n in range(1, 4)] == [0.25, 0.5, 1.0]


def test_the_backoff_is_capped() -> None:
    assert retry_backoff(7, 1.0, 60.0) == 60.0  # 64 capped
    assert retry_backoff(6, 1.0, 32.0) == 32.0  # exactly at the cap
    assert retry_backoff(100, 1.0, 60.0) == 60.0
    assert retry_backoff(10**9, 1.0, 60.0) == 60.0  # no overflow for absurd counts


@given(
    failures=st.integers(1, 10_000),
    base=st.floats(0.001, 100),
    cap=st.floats(0.001, 1e6),
)
def test_the_backoff_is_monotone_and_bounded(failures: int, base: float, cap: float) -> None:
    delay = retry_backoff(failures, base, cap)
    assert isinstance(delay, float)
    assert 0 < delay <= cap
    assert delay <= retry_backoff(failures + 1, base, cap)
    if failures <= 30:
        assert delay == min(cap, base * 2 ** (failures - 1))
