"""One scheduling round's plan: the store's queue read a page at a time, placed by the pure
policies (core/scheduler.py for free room, core/prefetch.py beyond it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from planetary_mesh.core.prefetch import NodeLoad, plan_prefetch, room_to_prefetch
from planetary_mesh.core.scheduler import (
    Demand,
    NodeCapacity,
    Placement,
    plan_placements,
    remaining_capacity,
)
from planetary_mesh.store.sqlite import SQLiteStore

# How many queued tasks one scheduling round looks at, at most; the round repeats while it
# fills up. It reads the queue in pages from SCHEDULE_FIRST_PAGE on, growing fourfold.
SCHEDULE_BATCH = 4096
SCHEDULE_FIRST_PAGE = 64


def plan_round(
    store: SQLiteStore,
    nodes: Callable[[], list[NodeLoad]],
    depths: Mapping[int, int],
    now: float,
) -> list[Placement]:
    """Read the queue only as far as free room remains: a round with one free slot looks at a
    few dozen tasks, not thousands (greedy backfill still looks past tasks that fit nowhere, up
    to SCHEDULE_BATCH of them). Then tasks of short jobs (``depths``) among those read are
    prefetched beyond the room; prefetching alone reads one page, never more. ``nodes`` is
    asked for only when something waits: most rounds after a report find the queue empty and
    do no per-node work at all."""
    first = store.pending_demands(SCHEDULE_FIRST_PAGE, now)
    if not first:
        return []
    loads = nodes()
    capacity = [
        NodeCapacity(
            n.node_id, n.cpus - n.used_cpus, n.memory - n.used_memory, n.gpus - n.used_gpus
        )
        for n in loads
    ]
    free = remaining_capacity(capacity, [], [])
    prefetching = room_to_prefetch(loads, depths)
    placements: list[Placement] = []
    seen: list[Demand] = []
    offset, page = 0, SCHEDULE_FIRST_PAGE
    while free or (prefetching and offset == 0):
        queue = first if offset == 0 else store.pending_demands(page, now, offset)
        seen += queue
        planned = plan_placements(free, queue)
        placements += planned
        free = remaining_capacity(free, planned, queue)
        offset += len(queue)
        if len(queue) < page or offset >= SCHEDULE_BATCH:
            break
        page = min(page * 4, SCHEDULE_BATCH - offset)
    if prefetching:
        placed = {p.task_id for p in placements}
        leftover = [d for d in seen if d.task_id not in placed]
        placements += plan_prefetch(loads_after(loads, placements, seen), leftover, depths)
    return placements


def loads_after(
    loads: list[NodeLoad], placements: list[Placement], demands: list[Demand]
) -> list[NodeLoad]:
    """``loads`` with ``placements`` (of ``demands``) added to what the nodes hold."""
    sizes = {d.task_id: d for d in demands}
    held = {n.node_id: [n.used_cpus, n.used_memory, n.used_gpus] for n in loads}
    for placement in placements:
        demand = sizes[placement.task_id]
        held[placement.node_id][0] += demand.cpus
        held[placement.node_id][1] += demand.memory
        held[placement.node_id][2] += demand.gpus
    return [
        NodeLoad(
            n.node_id,
            n.cpus,
            n.memory,
            held[n.node_id][0],
            int(held[n.node_id][1]),
            n.gpus,
            int(held[n.node_id][2]),
        )
        for n in loads
    ]
