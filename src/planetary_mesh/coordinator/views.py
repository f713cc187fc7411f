"""From the domain's records to what the API shows: JobInfo, TaskInfo, NodeInfo and friends."""

from __future__ import annotations

from dataclasses import asdict

from planetary_mesh.coordinator.service import CoordinatorService
from planetary_mesh.core.model import Attempt, Job, Node, NodeAttempt, Task, Throughput
from planetary_mesh.core.states import NodeState, TaskState
from planetary_mesh.errors import NotFound
from planetary_mesh.protocol import (
    AttemptInfo,
    EventInfo,
    JobInfo,
    NodeAttemptInfo,
    NodeInfo,
    OverviewInfo,
    TaskInfo,
    ThroughputInfo,
    Usage,
)


def node(service: CoordinatorService, node_id: str) -> NodeInfo:
    found = service.store.node(node_id)
    if found is None:
        raise NotFound(f"no node {node_id}; `mesh nodes` lists them")
    return node_info(found, service.usage.get(node_id))


def attempt_info(a: Attempt) -> AttemptInfo:
    return AttemptInfo(
        attempt=a.number,
        node=a.node_id,
        state=a.state.value,
        exit_code=a.exit_code,
        reason=a.reason,
        assigned_at=a.assigned_at,
        started_at=a.started_at,
        ended_at=a.ended_at,
        late_result=a.late_result,
    )


def job_info(
    job: Job, tasks: list[Task] | None = None, history: dict[int, list[Attempt]] | None = None
) -> JobInfo:
    counts = {state.value: job.counts.get(state, 0) for state in TaskState}
    return JobInfo(
        id=job.id,
        name=job.spec.name,
        owner=job.owner,
        state=job.state.value,
        created_at=job.created_at,
        argv=list(job.spec.argv),
        cpus=job.spec.cpus,
        memory=job.spec.memory,
        timeout=job.spec.timeout,
        retries=job.spec.retries,
        priority=job.spec.priority,
        files=list(job.file_names),
        outputs=list(job.spec.outputs),
        cancelled_by=job.cancelled_by,
        tasks={"total": job.spec.count, **counts},
        python=job.spec.python,
        gpus=job.spec.gpus,
        task_list=None
        if tasks is None
        else [task_info(t, (history or {}).get(t.index, [])) for t in tasks],
    )


def task_info(task: Task, history: list[Attempt]) -> TaskInfo:
    return TaskInfo(
        index=task.index,
        state=task.state.value,
        node=task.node_id,
        exit_code=task.exit_code,
        reason=task.reason,
        attempts=task.attempt,
        started_at=task.started_at,
        ended_at=task.ended_at,
        history=[attempt_info(a) for a in history],
    )


def node_info(node: Node, usage: Usage | None = None) -> NodeInfo:
    """A node as people see it; ``usage`` (its machine's own CPU and memory use) only while
    the node is heard from, since an old figure would look live."""
    live = usage if node.state is NodeState.READY else None
    return NodeInfo(
        id=node.id,
        name=node.name,
        state=node.shown_state.value,
        cpus=node.cpus,
        memory=node.memory,
        used_cpus=node.used_cpus,
        used_memory=node.used_memory,
        running=node.running,
        sandbox=node.sandbox,
        version=node.version,
        last_seen=node.last_seen,
        drain_deadline=node.drain_deadline,
        labels=dict(node.labels),
        gpus=node.gpus,
        used_gpus=node.used_gpus,
        cpu_percent=None if live is None else live.cpu_percent,
        memory_in_use=None if live is None else live.memory_in_use,
    )


def nodes(service: CoordinatorService) -> list[NodeInfo]:
    return [node_info(n, service.usage.get(n.id)) for n in service.store.nodes()]


def node_attempt_info(item: NodeAttempt) -> NodeAttemptInfo:
    """An attempt as attempt_info shows it, less its node (the page is the node's), with
    which task it was."""
    shown = attempt_info(item.attempt).model_dump(exclude={"node", "late_result"})
    return NodeAttemptInfo(job_id=item.job_id, index=item.index, **shown)


def throughput_info(t: Throughput) -> ThroughputInfo:
    return ThroughputInfo(
        since=t.since,
        bucket_seconds=t.bucket,
        succeeded=list(t.succeeded),
        failed=list(t.failed),
        other=list(t.other),
    )


def overview(
    service: CoordinatorService, window: float, bucket: float, events: int
) -> OverviewInfo:
    """The front page: nodes and tasks by state, tasks ended per ``bucket`` over the last
    ``window`` seconds, and the latest ``events``."""
    now = service.clock()
    by_state = {state.value: 0 for state in NodeState}
    for n in service.store.nodes():
        by_state[n.shown_state.value] += 1
    by_state["total"] = sum(by_state.values())
    tasks = {state.value: 0 for state in TaskState}
    tasks.update(service.store.task_state_counts())
    # Slots end at the next whole bucket, so a chart drawn twice a second does not jitter.
    until = (now // bucket + 1) * bucket
    recent = service.store.latest_events(events)
    return OverviewInfo(
        nodes=by_state,
        tasks=tasks,
        throughput=throughput_info(service.store.throughput(until - window, until, bucket)),
        events=[EventInfo(**asdict(e)) for e in recent],
    )
