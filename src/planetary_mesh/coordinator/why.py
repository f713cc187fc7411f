"""`mesh why`: a plain answer to "why is my task pending" and "why did it end like that".

Pure: the service gathers the facts (the job, the task, the nodes, which are connected, the
task's place in the queue) and this module words them. For a pending task every node gets its
reason, in the order the scheduler would hit them: gone, not connected, draining, too small for
the job ever (memory, CPUs, GPUs), not enough free right now, or room (then the queue or a
retry backoff is why).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from planetary_mesh.core.model import Job, Node, Task
from planetary_mesh.core.states import NodeState, TaskState
from planetary_mesh.units import format_size


@dataclass(frozen=True)
class NodeReason:
    node_id: str
    name: str
    fits_now: bool
    reason: str


@dataclass(frozen=True)
class Explanation:
    summary: str
    nodes: list[NodeReason]


def _cpus(value: float) -> str:
    return f"{value:g} CPU" + ("" if value == 1 else "s")


def _gpus(value: int) -> str:
    return f"{value} GPU" + ("" if value == 1 else "s")


def node_reason(job: Job, node: Node, connected: bool) -> NodeReason:
    """Why ``node`` does not take a task of ``job`` now, or that it could."""
    spec = job.spec

    def said(reason: str, fits: bool = False) -> NodeReason:
        return NodeReason(node.id, node.name, fits, reason)

    if node.state is NodeState.LOST:
        return said("lost: not heard from; it gets no work until its agent is back")
    if node.state is NodeState.SUSPECT or not connected:
        return said("not connected now (suspect): it gets no new work until it is back")
    if node.draining:
        return said("draining: it takes no new work")
    if spec.memory > node.memory:
        return said(
            f"too small: the job asks {format_size(spec.memory)} of memory a task, the node"
            f" has {format_size(node.memory)} in all"
        )
    if spec.cpus > node.cpus:
        return said(f"too small: the job asks {_cpus(spec.cpus)}, the node has {node.cpus:g}")
    if spec.gpus > node.gpus:
        return said(f"too small: the job asks {_gpus(spec.gpus)} a task, the node has {node.gpus}")
    free_memory = node.memory - node.used_memory
    if spec.memory > free_memory:
        return said(
            f"not enough free memory: needs {format_size(spec.memory)},"
            f" {format_size(max(0, free_memory))} free of {format_size(node.memory)}"
        )
    free_cpus = node.cpus - node.used_cpus
    if spec.cpus > free_cpus + 1e-9:
        return said(
            f"not enough free CPUs: needs {spec.cpus:g}, {max(0.0, free_cpus):g} free"
            f" of {node.cpus:g}"
        )
    free_gpus = node.gpus - node.used_gpus
    if spec.gpus > free_gpus:
        return said(f"not enough free GPUs: needs {spec.gpus}, {free_gpus} free of {node.gpus}")
    return said("has room for it", fits=True)


def explain_pending(
    job: Job,
    nodes: list[Node],
    connected: set[str],
    ahead: int,
    not_before: float | None,
    now: float,
) -> Explanation:
    """Why a pending task of ``job`` waits; ``ahead`` is how many queued tasks go first."""
    reasons = [node_reason(job, node, node.id in connected) for node in nodes]
    if not nodes:
        summary = "pending: the mesh has no nodes yet; start an agent (`mesh agent`)"
    elif not_before is not None and not_before > now:
        when = datetime.fromtimestamp(not_before).strftime("%H:%M:%S")
        summary = f"pending: waiting out its retry backoff until {when}"
    elif all(
        job.spec.memory > n.memory or job.spec.cpus > n.cpus or job.spec.gpus > n.gpus
        for n in nodes
    ):
        summary = (
            "pending, and no node can ever run it: it asks for more than any node has;"
            " submit it again with less --memory, --cpus or --gpus, or add a bigger node"
        )
    elif any(r.fits_now for r in reasons):
        queue = f"{ahead} queued tasks go first" if ahead else "it is next in the queue"
        summary = f"pending: a node has room and {queue}; it is placed within a round"
    else:
        summary = "pending: no node has room for it right now (each node's reason below)"
    return Explanation(summary, reasons)


def explain_placed(job: Job, task: Task) -> Explanation:
    """Why a task that is placed, running or ended is where it is."""
    state = task.state
    if state in (TaskState.ASSIGNED, TaskState.RUNNING):
        since = task.started_at if state is TaskState.RUNNING else None
        at = f" since {datetime.fromtimestamp(since):%H:%M:%S}" if since else ""
        return Explanation(f"{state.value} on node {task.node_id}{at} (attempt {task.attempt})", [])
    if state is TaskState.SUCCEEDED:
        return Explanation(
            f"succeeded (attempt {task.attempt}): {task.reason or 'exit code 0'}", []
        )
    if state is TaskState.CANCELLED:
        by = job.cancelled_by
        return Explanation(
            f"cancelled{f' by {by}' if by else ''}: {task.reason or ''}".rstrip(": "), []
        )
    tries = f"after {task.attempt} attempts" if task.attempt > 1 else "on its only attempt"
    return Explanation(f"failed {tries}: {task.reason or 'no reason recorded'}", [])
