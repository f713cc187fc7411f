"""Placement: properties that must hold for any view and queue, and a few worked examples."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planetary_mesh.core.scheduler import (
    Demand,
    NodeCapacity,
    Placement,
    plan_placements,
    remaining_capacity,
)

GIB = 1024**3
MIB = 1024**2
# The scheduler lets CPU shares round a little (10 x 0.1 fits 1.0); over a whole plan the
# slack must stay far below anything a person would call oversubscription.
CPU_SLACK = 1e-6


def fits(cpus: float, memory: float, demand: Demand) -> bool:
    return cpus + CPU_SLACK >= demand.cpus and memory >= demand.memory


def remaining(
    nodes: list[NodeCapacity], queue: list[Demand], plan: list[Placement]
) -> dict[str, tuple[float, int]]:
    by_id = {d.task_id: d for d in queue}
    left = {n.node_id: (n.free_cpus, n.free_memory) for n in nodes}
    for placement in plan:
        cpus, memory = left[placement.node_id]
        demand = by_id[placement.task_id]
        left[placement.node_id] = (cpus - demand.cpus, memory - demand.memory)
    return left


# -- strategies ---------------------------------------------------------------------------------

# CPU shares as people write them (0.1 .. 8 in tenths) and as floats; memory in MiB steps.
cpu_demands = st.one_of(
    st.integers(1, 80).map(lambda tenths: tenths / 10),
    st.floats(min_value=0.01, max_value=8, allow_nan=False, allow_infinity=False),
)
memory_demands = st.integers(1, 8 * 1024).map(lambda mib: mib * MIB)


@st.composite
def views(draw: st.DrawFn) -> tuple[list[NodeCapacity], list[Demand]]:
    node_count = draw(st.integers(0, 6))
    nodes = [
        NodeCapacity(
            f"node-{i}",
            draw(st.integers(0, 160).map(lambda tenths: tenths / 10)),
            draw(st.integers(0, 64 * 1024).map(lambda mib: mib * MIB)),
        )
        for i in range(node_count)
    ]
    # A few distinct demand shapes, as a queue of array jobs has: identical demands are common.
    shapes = draw(st.lists(st.tuples(cpu_demands, memory_demands), min_size=1, max_size=5))
    picks = draw(st.lists(st.integers(0, len(shapes) - 1), max_size=60))
    queue = [Demand(task_id, *shapes[pick]) for task_id, pick in enumerate(picks)]
    return nodes, queue


# -- properties ---------------------------------------------------------------------------------
# Each property is a function of (nodes, queue, plan); one hypothesis test runs them all on the
# same examples, which keeps the suite fast without weakening any of them.

View = tuple[list[NodeCapacity], list[Demand]]


def no_node_is_oversubscribed(
    nodes: list[NodeCapacity], queue: list[Demand], plan: list[Placement]
) -> None:
    left = remaining(nodes, queue, plan)
    for node in nodes:
        placed_here = [p for p in plan if p.node_id == node.node_id]
        if placed_here:
            cpus, memory = left[node.node_id]
            assert cpus >= -CPU_SLACK, ("CPUs oversubscribed", node, placed_here)
            assert memory >= 0, ("memory oversubscribed", node, placed_here)


def each_placed_task_came_from_the_queue_once(
    nodes: list[NodeCapacity], queue: list[Demand], plan: list[Placement]
) -> None:
    placed = Counter(p.task_id for p in plan)
    assert all(n == 1 for n in placed.values()), ("placed twice", placed)
    assert set(placed) <= {d.task_id for d in queue}, "placed a task not in the queue"
    assert {p.node_id for p in plan} <= {n.node_id for n in nodes}, "placed on an unknown node"


def a_task_is_skipped_only_if_it_fits_nowhere(
    nodes: list[NodeCapacity], queue: list[Demand], plan: list[Placement]
) -> None:
    # Capacity only shrinks as the plan grows, so a task that fit nowhere at its turn fits
    # nowhere in what is left at the end; and one that fits somewhere at the end would have fit
    # at its turn. Either way: no skipped task fits the final free capacity of any node.
    left = remaining(nodes, queue, plan)
    placed = {p.task_id for p in plan}
    for demand in queue:
        if demand.task_id in placed:
            continue
        for node_id, (cpus, memory) in left.items():
            assert not fits(cpus, memory, demand), ("skipped but fits", demand, node_id, cpus)


def identical_demands_are_placed_as_a_prefix(
    nodes: list[NodeCapacity], queue: list[Demand], plan: list[Placement]
) -> None:
    placed = {p.task_id for p in plan}
    by_shape: dict[tuple[float, int], list[bool]] = {}
    for demand in queue:
        by_shape.setdefault((demand.cpus, demand.memory), []).append(demand.task_id in placed)
    for shape, flags in by_shape.items():
        assert flags == sorted(flags, reverse=True), ("a later twin jumped ahead", shape, flags)


def the_plan_follows_queue_order(
    nodes: list[NodeCapacity], queue: list[Demand], plan: list[Placement]
) -> None:
    position = {d.task_id: i for i, d in enumerate(queue)}
    order = [position[p.task_id] for p in plan]
    assert order == sorted(order), "the plan is out of queue order"


@given(views())
def test_every_plan_keeps_the_invariants(view: View) -> None:
    nodes, queue = view
    before = (list(nodes), list(queue))
    plan = plan_placements(nodes, queue)
    assert (nodes, queue) == before, "the planner changed its inputs"
    assert plan_placements(nodes, queue) == plan, "the planner is not deterministic"
    no_node_is_oversubscribed(nodes, queue, plan)
    each_placed_task_came_from_the_queue_once(nodes, queue, plan)
    a_task_is_skipped_only_if_it_fits_nowhere(nodes, queue, plan)
    identical_demands_are_placed_as_a_prefix(nodes, queue, plan)
    the_plan_follows_queue_order(nodes, queue, plan)


def test_the_invariant_checks_catch_bad_plans() -> None:
    # Each check must be able to fail, or the property test above proves nothing.
    nodes = [NodeCapacity("a", 1.0, GIB)]
    queue = [Demand(1, 1.0, MIB), Demand(2, 1.0, MIB)]
    bad_plans = {
        no_node_is_oversubscribed: [Placement(1, "a"), Placement(2, "a")],
        each_placed_task_came_from_the_queue_once: [Placement(3, "a")],
        a_task_is_skipped_only_if_it_fits_nowhere: [],
        identical_demands_are_placed_as_a_prefix: [Placement(2, "a")],
    }
    for check, plan in bad_plans.items():
        with pytest.raises(AssertionError):
            check(nodes, queue, plan)
    with pytest.raises(AssertionError):
        the_plan_follows_queue_order(
            [NodeCapacity("a", 2.0, GIB)], queue, [Placement(2, "a"), Placement(1, "a")]
        )


# -- examples -----------------------------------------------------------------------------------


def test_work_spreads_to_the_node_with_the_most_free_cpu_first() -> None:
    nodes = [
        NodeCapacity("small", 3.25, 16 * GIB),
        NodeCapacity("big", 8.0, 16 * GIB),
        NodeCapacity("medium", 5.5, 16 * GIB),
    ]
    queue = [Demand(i, 2.0, GIB) for i in range(8)]
    plan = plan_placements(nodes, queue)
    assert [p.node_id for p in plan] == [
        "big",  # free: small 3.25, big 8, medium 5.5
        "big",  # big 6
        "medium",  # big 4, medium 5.5
        "big",  # big 4, medium 3.5
        "medium",  # big 2, medium 3.5, small 3.25
        "small",  # big 2, medium 1.5, small 3.25
        "big",  # big 2, medium 1.5, small 1.25
    ]
    # The eighth fits nowhere: 1.5 and 1.25 CPUs are left.
    assert [p.task_id for p in plan] == list(range(7))


def test_a_node_without_the_memory_is_passed_over_even_with_the_most_cpu() -> None:
    nodes = [NodeCapacity("cpu-rich", 16.0, GIB), NodeCapacity("mem-rich", 2.0, 64 * GIB)]
    plan = plan_placements(nodes, [Demand(1, 1.0, 8 * GIB), Demand(2, 1.0, 512 * MIB)])
    assert plan == [Placement(1, "mem-rich"), Placement(2, "cpu-rich")]


@pytest.mark.parametrize(
    ("free", "share", "count"),
    [(1.0, 0.1, 10), (0.3, 0.1, 3), (1.4, 0.1, 14), (1.2, 0.3, 4), (0.15, 0.05, 3)],
)
def test_n_equal_cpu_shares_fill_exactly_n_times_a_share(
    free: float, share: float, count: int
) -> None:
    # Float subtraction must not lose the last share: 10 tasks of 0.1 CPU fit one CPU.
    queue = [Demand(i, share, MIB) for i in range(count + 1)]
    plan = plan_placements([NodeCapacity("n", free, GIB)], queue)
    assert [p.task_id for p in plan] == list(range(count))


def test_a_big_task_that_fits_nowhere_does_not_block_small_ones_behind_it() -> None:
    nodes = [NodeCapacity("a", 2.0, 4 * GIB), NodeCapacity("b", 1.0, 4 * GIB)]
    queue = [Demand(1, 4.0, GIB), Demand(2, 1.0, 8 * GIB), Demand(3, 1.0, GIB), Demand(4, 4.0, GIB)]
    assert plan_placements(nodes, queue) == [Placement(3, "a")]


def test_full_or_overcommitted_nodes_take_nothing() -> None:
    nodes = [NodeCapacity("full", 0.0, GIB), NodeCapacity("over", -1.0, -GIB)]
    assert plan_placements(nodes, [Demand(1, 0.5, MIB)]) == []


@pytest.mark.parametrize(
    ("nodes", "queue"),
    [
        ([], []),
        ([], [Demand(1, 1.0, MIB)]),
        ([NodeCapacity("n", 4.0, GIB)], []),
    ],
)
def test_empty_inputs_give_an_empty_plan(nodes: list[NodeCapacity], queue: list[Demand]) -> None:
    assert plan_placements(nodes, queue) == []


def test_nodes_may_be_any_iterable() -> None:
    nodes = (NodeCapacity(f"n{i}", 1.0, GIB) for i in range(2))
    plan = plan_placements(nodes, [Demand(1, 1.0, MIB), Demand(2, 1.0, MIB)])
    assert sorted(p.node_id for p in plan) == ["n0", "n1"]


# -- cost: counted, never timed -----------------------------------------------------------------


class WorkBudgetExceeded(Exception):
    pass


class CountingDemand(Demand):
    """A demand that counts how often the planner reads its size, and stops it past a budget.

    Every comparison the planner makes reads ``cpus`` or ``memory``, so the number of reads is
    a fair measure of its work, free of the machine's speed and load.
    """

    reads = 0
    budget: int | None = None  # None: count without stopping

    def __getattribute__(self, name: str) -> Any:
        if name in ("cpus", "memory"):
            cls = CountingDemand
            cls.reads += 1
            if cls.budget is not None and cls.reads > cls.budget:
                cls.budget = None  # raise once; a repr in the traceback must still work
                raise WorkBudgetExceeded
        return super().__getattribute__(name)


NODES_3 = [NodeCapacity(f"node-{i}", 1.5, 4 * GIB) for i in range(3)]
QUEUE_SIZE = 10_000
# A linear planner reads each task's size a bounded number of times per node: a few for the fit
# test on 3 nodes, a few for remembering what fits nowhere. 20 per task leaves room for that and
# none for a scan that grows with the queue (which would need thousands per task here).
READS_PER_TASK = 20


def _count_reads(queue_shapes: list[tuple[float, int]]) -> int:
    queue = [CountingDemand(i, cpus, memory) for i, (cpus, memory) in enumerate(queue_shapes)]
    CountingDemand.reads = 0
    CountingDemand.budget = READS_PER_TASK * len(queue)
    try:
        plan_placements(NODES_3, queue)
    except WorkBudgetExceeded:
        pass  # stopped early: the count is already over the budget, and the caller says so
    finally:
        CountingDemand.budget = None
    return CountingDemand.reads


def test_a_big_array_behind_full_nodes_costs_a_bounded_amount_per_task() -> None:
    # One array job: 3 tasks start (one per node, 0.5 CPU left on each), the rest wait.
    reads = _count_reads([(1.0, 256 * MIB)] * QUEUE_SIZE)
    assert reads <= READS_PER_TASK * QUEUE_SIZE, "the planner's work grows faster than its queue"


def test_many_unplaceable_jobs_of_different_sizes_cost_a_bounded_amount_per_task() -> None:
    # Many single-task jobs, none of which fits (each wants 2 CPUs, every node has 1.5), with
    # memory requests that shrink along the queue (a sweep submitted largest first). None is
    # placeable, so the planner must not compare each with every one it skipped before.
    shapes = [(2.0, (QUEUE_SIZE - i) * MIB) for i in range(QUEUE_SIZE)]
    reads = _count_reads(shapes)
    assert reads <= READS_PER_TASK * QUEUE_SIZE, "the planner's work grows faster than its queue"


@settings(max_examples=25)
@given(st.lists(st.tuples(cpu_demands, memory_demands), min_size=1, max_size=400))
def test_the_cost_per_task_is_bounded_for_random_queues(shapes: list[tuple[float, int]]) -> None:
    assert _count_reads(shapes) <= READS_PER_TASK * len(shapes)


def test_remaining_capacity_subtracts_placements_and_drops_full_nodes() -> None:
    nodes = [NodeCapacity("a", 2.0, 1000), NodeCapacity("b", 1.0, 1000)]
    queue = [Demand(1, 1.0, 100), Demand(2, 1.0, 100), Demand(3, 0.5, 900)]
    placed = [Placement(1, "a"), Placement(2, "b"), Placement(3, "a")]
    # a keeps half a CPU but no memory, b no CPU: neither can take more
    assert remaining_capacity(nodes, placed, queue) == []
    assert remaining_capacity(nodes, [], []) == nodes
    assert remaining_capacity(nodes, [Placement(1, "a")], queue) == [
        NodeCapacity("a", 1.0, 900),
        NodeCapacity("b", 1.0, 1000),
    ]
