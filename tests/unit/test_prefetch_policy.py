"""Prefetch: which jobs a node may hold beyond its room, how much, and where it goes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from planetary_mesh.core.prefetch import (
    PREFETCH_BELOW_S,
    PREFETCH_MAX_DEPTH,
    JobDurations,
    NodeLoad,
    plan_prefetch,
    prefetch_depth,
    room_to_prefetch,
)
from planetary_mesh.core.scheduler import Demand

MIB = 1024**2


def test_only_short_known_jobs_are_prefetched() -> None:
    assert prefetch_depth(None) == 0  # nothing ended yet: unknown, not prefetched
    assert prefetch_depth(PREFETCH_BELOW_S) == 0
    assert prefetch_depth(30.0) == 0
    assert prefetch_depth(0.15) == 1
    assert prefetch_depth(0.02) == 3
    assert prefetch_depth(0.0) == PREFETCH_MAX_DEPTH  # tiny tasks: deep, but bounded


def test_durations_follow_a_job_that_slows_down() -> None:
    durations = JobDurations(alpha=0.5)
    durations.record(7, 0.005)
    assert durations.depths() == {7: PREFETCH_MAX_DEPTH}
    for _ in range(10):
        durations.record(7, 2.0)
    assert durations.depths() == {}  # its tasks now take seconds: no longer prefetched
    assert durations.mean(7) is not None and durations.mean(7) > 1.0  # type: ignore[operator]


def test_prefetch_fills_up_to_depth_on_the_least_loaded_node() -> None:
    nodes = [NodeLoad("a", 1.0, 1024 * MIB, 1.0, 0), NodeLoad("b", 1.0, 1024 * MIB, 2.0, 0)]
    queue = [Demand(i, 1.0, MIB, job_seq=1) for i in range(10)]
    plan = plan_prefetch(nodes, queue, {1: 2})
    on = [p.node_id for p in plan]
    # a holds 1 (its room) and may hold 2 more; b already holds 2 and may take 1.
    assert sorted(on) == ["a", "a", "b"]
    assert on[0] == "a"  # the least loaded first


def test_long_or_unknown_jobs_and_too_big_tasks_stay_queued() -> None:
    nodes = [NodeLoad("a", 2.0, 1024 * MIB, 2.0, 0)]
    queue = [
        Demand(1, 1.0, MIB, job_seq=1),  # a long job (no depth)
        Demand(2, 4.0, MIB, job_seq=2),  # more CPUs than the node has at all
        Demand(3, 1.0, 2048 * MIB, job_seq=2),  # more memory than the node has at all
    ]
    assert plan_prefetch(nodes, queue, {2: 8}) == []
    assert not room_to_prefetch(nodes, {})


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 8), st.integers(1, 64), st.integers(0, 40)), min_size=1, max_size=4
    ),
    st.lists(st.tuples(st.integers(1, 40), st.integers(1, 32), st.integers(0, 2)), max_size=60),
    st.dictionaries(st.integers(0, 2), st.integers(0, PREFETCH_MAX_DEPTH)),
)
def test_a_node_never_holds_more_than_its_depth_allows(
    shapes: list[tuple[int, int, int]],
    demands: list[tuple[int, int, int]],
    depths: dict[int, int],
) -> None:
    nodes = [
        NodeLoad(f"n{i}", float(c), m * MIB, float(u) / 10, 0) for i, (c, m, u) in enumerate(shapes)
    ]
    queue = [Demand(i, c / 10, m * MIB, job_seq=j) for i, (c, m, j) in enumerate(demands)]
    plan = plan_prefetch(nodes, queue, depths)
    by_id = {d.task_id: d for d in queue}
    assert len({p.task_id for p in plan}) == len(plan)  # each task placed once
    deepest = 1 + max(depths.values(), default=0)
    for node in nodes:
        mine = [by_id[p.task_id] for p in plan if p.node_id == node.node_id]
        for demand in mine:
            assert depths.get(demand.job_seq, 0) > 0  # only short jobs
            assert demand.cpus <= node.cpus + 1e-9 and demand.memory <= node.memory
        if mine:
            held = node.used_cpus + sum(d.cpus for d in mine)
            assert held <= node.cpus * deepest + 1e-6
