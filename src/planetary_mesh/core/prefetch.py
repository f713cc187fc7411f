"""Prefetch: a node is handed more of a job's short tasks than it has room to run at once.

With one task per free CPU, a node that finishes a 5 ms task sits idle for a whole round trip
(its report, the coordinator's commit, the next assignment) before the next one starts: on a
one-CPU agent that caps a job of tiny tasks at one task per round trip. Like Ray's worker
leases and Dask's eager task sending, a node may hold a few tasks of such a job beyond its
room; the agent queues them and starts each as soon as one of its own ends (admission is the
agent's, by the same CPUs and memory). Only jobs whose tasks are known to be short are
prefetched, and only a little of them, so a node never sits on long work another node could
run now, and the tail of a job is spread within a fraction of a second.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from planetary_mesh.core.scheduler import Demand, Placement

PREFETCH_BELOW_S = 0.2  # a job whose tasks take less than this on average is prefetched
PREFETCH_WINDOW_S = 0.05  # queue about this much work per CPU: more than one round trip
PREFETCH_MAX_DEPTH = 8  # tasks queued per CPU at most, however short
_EPSILON = 1e-9
_TRACKED_JOBS = 1024  # durations are kept for this many recently ended-in jobs


def prefetch_depth(mean_duration: float | None) -> int:
    """How many tasks per CPU a node may hold queued for a job whose tasks take this long
    (0: none; unknown durations are not prefetched)."""
    if mean_duration is None or mean_duration >= PREFETCH_BELOW_S:
        return 0
    wanted = math.ceil(PREFETCH_WINDOW_S / max(mean_duration, 1e-6))
    return max(1, min(PREFETCH_MAX_DEPTH, wanted))


class JobDurations:
    """A moving mean of each job's task durations, for the jobs that ended tasks lately.

    Kept in memory only: a hint, relearned from the first ends after a restart."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self._means: OrderedDict[int, float] = OrderedDict()
        self._depths: dict[int, int] = {}  # kept up to date: read on every scheduling round

    def record(self, job_seq: int, seconds: float) -> None:
        seconds = max(0.0, seconds)
        mean = self._means.pop(job_seq, None)
        mean = seconds if mean is None else mean + self.alpha * (seconds - mean)
        self._means[job_seq] = mean
        depth = prefetch_depth(mean)
        if depth:
            self._depths[job_seq] = depth
        else:
            self._depths.pop(job_seq, None)
        while len(self._means) > _TRACKED_JOBS:
            forgotten, _ = self._means.popitem(last=False)
            self._depths.pop(forgotten, None)

    def mean(self, job_seq: int) -> float | None:
        return self._means.get(job_seq)

    def depths(self) -> Mapping[int, int]:
        """Prefetch depth of every tracked job that has one (a live, read-only view)."""
        return MappingProxyType(self._depths)


@dataclass(frozen=True)
class NodeLoad:
    """A node's size and what the store says its tasks (queued or running) hold."""

    node_id: str
    cpus: float
    memory: int
    used_cpus: float
    used_memory: int
    gpus: int = 0
    used_gpus: int = 0


def plan_prefetch(
    nodes: Iterable[NodeLoad], queue: Sequence[Demand], depths: Mapping[int, int]
) -> list[Placement]:
    """Place tasks of short jobs (``depths``: job seq -> tasks per CPU) beyond nodes' room, up
    to that depth; each to the least loaded node that could run it at all."""
    load = {n.node_id: [n.used_cpus, float(n.used_memory)] for n in nodes}
    size = {n.node_id: (n.cpus, n.memory) for n in nodes}
    placements: list[Placement] = []
    for demand in queue:
        depth = depths.get(demand.job_seq, 0)
        if depth <= 0 or demand.gpus:  # a GPU is a device, not a share: never queued beyond
            continue
        best: str | None = None
        best_ratio = math.inf
        for node_id, (used_cpus, used_memory) in load.items():
            cpus, memory = size[node_id]
            limit = 1 + depth
            if (
                demand.cpus <= cpus + _EPSILON
                and demand.memory <= memory
                and used_cpus + demand.cpus <= cpus * limit + _EPSILON
                and used_memory + demand.memory <= memory * limit
            ):
                ratio = used_cpus / cpus if cpus > 0 else math.inf
                if ratio < best_ratio:
                    best, best_ratio = node_id, ratio
        if best is None:
            continue
        load[best][0] += demand.cpus
        load[best][1] += demand.memory
        placements.append(Placement(demand.task_id, best))
    return placements


def room_to_prefetch(nodes: Iterable[NodeLoad], depths: Mapping[int, int]) -> bool:
    """Whether any node could take a prefetched task of any short job (a cheap upper bound)."""
    if not depths:
        return False
    deepest = 1 + PREFETCH_MAX_DEPTH
    return any(n.cpus > 0 and n.used_cpus + _EPSILON < n.cpus * deepest for n in nodes)
