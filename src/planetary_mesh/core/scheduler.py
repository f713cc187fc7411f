"""Placement: a pure function from a view of free capacity and a queue to a plan.

As in Nomad's scheduler, it reads a snapshot and returns a plan; the service commits the plan.
Policy v0: highest priority first, then oldest (the caller passes the queue in that order);
each task goes to the node with the most free CPU that fits its CPUs, memory and GPUs (whole
devices), so work spreads across machines; a node is never oversubscribed. Tasks that fit
nowhere are skipped so smaller work behind them can still start (greedy backfill).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# CPU shares are compared with a little slack so that 10 tasks of 0.1 CPU fit one CPU.
_EPSILON = 1e-9


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    free_cpus: float
    free_memory: int
    free_gpus: int = 0


@dataclass(frozen=True)
class Demand:
    task_id: int
    cpus: float
    memory: int
    job_seq: int = 0  # which job, for per-job policy such as prefetch depth
    gpus: int = 0


@dataclass(frozen=True)
class Placement:
    task_id: int
    node_id: str


def plan_placements(nodes: Iterable[NodeCapacity], queue: Sequence[Demand]) -> list[Placement]:
    """Place as much of ``queue`` (already in priority order) as fits on ``nodes``."""
    free = {n.node_id: [n.free_cpus, float(n.free_memory), n.free_gpus] for n in nodes}
    placements: list[Placement] = []
    # Once a (cpus, memory, gpus) demand fits nowhere, every later task with at least that
    # demand cannot fit either: remembering it keeps a 10,000-task array from costing 10,000
    # scans. Only the minimal such demands are kept (a Pareto frontier), so the check stays short.
    unplaceable: list[tuple[float, int, int]] = []
    for demand in queue:
        if not free:
            break
        if any(
            demand.cpus >= c and demand.memory >= m and demand.gpus >= g for c, m, g in unplaceable
        ):
            continue
        best: str | None = None
        best_cpus = -1.0
        for node_id, (cpus, memory, gpus) in free.items():
            if (
                cpus + _EPSILON >= demand.cpus
                and memory >= demand.memory
                and gpus >= demand.gpus
                and cpus > best_cpus
            ):
                best, best_cpus = node_id, cpus
        if best is None:
            unplaceable = [
                (c, m, g)
                for c, m, g in unplaceable
                if not (c >= demand.cpus and m >= demand.memory and g >= demand.gpus)
            ]
            unplaceable.append((demand.cpus, demand.memory, demand.gpus))
            continue
        slot = free[best]
        slot[0] -= demand.cpus
        slot[1] -= demand.memory
        slot[2] -= demand.gpus
        if slot[0] <= _EPSILON or slot[1] <= 0:
            del free[best]
        placements.append(Placement(demand.task_id, best))
    return placements


def remaining_capacity(
    nodes: Iterable[NodeCapacity], placements: Sequence[Placement], queue: Sequence[Demand]
) -> list[NodeCapacity]:
    """What is left free on ``nodes`` after ``placements`` (of demands in ``queue``); nodes
    left with no CPU or no memory are dropped."""
    demands = {d.task_id: d for d in queue}
    free = {n.node_id: [n.free_cpus, n.free_memory, n.free_gpus] for n in nodes}
    for placement in placements:
        demand = demands[placement.task_id]
        slot = free[placement.node_id]
        slot[0] -= demand.cpus
        slot[1] -= demand.memory
        slot[2] -= demand.gpus
    return [
        NodeCapacity(node_id, float(cpus), int(memory), int(gpus))
        for node_id, (cpus, memory, gpus) in free.items()
        if cpus > _EPSILON and memory > 0
    ]
