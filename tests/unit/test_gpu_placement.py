"""GPUs are placed like CPUs and memory: whole devices, never two tasks on one, and a task that
asks for none never waits for one. Pure policy, no I/O."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from planetary_mesh.core.prefetch import NodeLoad, plan_prefetch
from planetary_mesh.core.scheduler import (
    Demand,
    NodeCapacity,
    plan_placements,
    remaining_capacity,
)

GIB = 1024**3


def test_a_gpu_task_goes_only_where_a_gpu_is_free() -> None:
    nodes = [NodeCapacity("cpu-only", 8, 8 * GIB), NodeCapacity("gpu", 1, 8 * GIB, free_gpus=1)]
    queue = [Demand(1, 1, GIB, gpus=1), Demand(2, 1, GIB, gpus=1), Demand(3, 1, GIB)]
    plan = plan_placements(nodes, queue)
    assert {(p.task_id, p.node_id) for p in plan} == {(1, "gpu"), (3, "cpu-only")}


def test_a_task_needing_more_gpus_than_any_node_has_does_not_block_others() -> None:
    nodes = [NodeCapacity("a", 4, 8 * GIB, free_gpus=1), NodeCapacity("b", 4, 8 * GIB, free_gpus=1)]
    queue = [Demand(1, 1, GIB, gpus=2), Demand(2, 1, GIB, gpus=1), Demand(3, 1, GIB, gpus=1)]
    plan = plan_placements(nodes, queue)
    assert sorted(p.task_id for p in plan) == [2, 3]
    assert len({p.node_id for p in plan}) == 2  # one GPU each: they cannot share a node


def test_remaining_capacity_counts_gpus_and_keeps_nodes_with_cpu_left() -> None:
    nodes = [NodeCapacity("a", 4, 8 * GIB, free_gpus=2)]
    queue = [Demand(1, 1, GIB, gpus=2)]
    plan = plan_placements(nodes, queue)
    (left,) = remaining_capacity(nodes, plan, queue)
    assert (left.free_cpus, left.free_gpus) == (3, 0)
    assert plan_placements([left], [Demand(2, 1, GIB, gpus=1)]) == []
    assert [p.task_id for p in plan_placements([left], [Demand(3, 1, GIB)])] == [3]


def test_gpu_tasks_are_never_prefetched() -> None:
    loads = [NodeLoad("a", 1, 8 * GIB, 1, GIB, gpus=1, used_gpus=1)]
    queue = [Demand(1, 0.1, GIB, job_seq=7, gpus=1), Demand(2, 0.1, GIB, job_seq=7)]
    assert [p.task_id for p in plan_prefetch(loads, queue, {7: 8})] == [2]


@settings(max_examples=200, deadline=None)
@given(
    gpus=st.lists(st.integers(0, 4), min_size=1, max_size=5),
    wants=st.lists(st.integers(0, 3), max_size=40),
)
def test_no_node_is_given_more_gpus_than_it_has_free(gpus: list[int], wants: list[int]) -> None:
    nodes = [NodeCapacity(f"n{i}", 64, 64 * GIB, free_gpus=g) for i, g in enumerate(gpus)]
    queue = [Demand(i, 0.5, GIB, gpus=w) for i, w in enumerate(wants)]
    plan = plan_placements(nodes, queue)
    given_out: dict[str, int] = {}
    for placement in plan:
        given_out[placement.node_id] = (
            given_out.get(placement.node_id, 0) + wants[placement.task_id]
        )
    for node in nodes:
        assert given_out.get(node.node_id, 0) <= node.free_gpus
    # Every task that asks for no GPU fits (there is CPU and memory for all of them).
    placed = {p.task_id for p in plan}
    assert all(i in placed for i, w in enumerate(wants) if w == 0)
