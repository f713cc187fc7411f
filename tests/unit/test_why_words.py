"""The words of `mesh why`, from plain facts: each node's reason, and the summary."""

from __future__ import annotations

from planetary_mesh.coordinator.why import explain_pending, node_reason
from planetary_mesh.core.model import Job, JobSpec, Node
from planetary_mesh.core.states import JobState, NodeState

GIB = 1024**3


def job(memory: int = GIB, cpus: float = 1.0) -> Job:
    spec = JobSpec(name="j", argv=("true",), memory=memory, cpus=cpus)
    return Job("j1", "alice", spec, JobState.PENDING, 0.0, (), {})


def node(
    node_id: str = "n1",
    state: NodeState = NodeState.READY,
    memory: int = 4 * GIB,
    used_memory: int = 0,
    cpus: float = 2,
    used_cpus: float = 0,
    draining: bool = False,
) -> Node:
    return Node(
        node_id, f"name-{node_id}", state, cpus, memory, used_cpus, used_memory, 0, "bwrap",
        "1", 0.0, 0.0, draining=draining,
    )  # fmt: skip


def test_each_reason_in_the_order_the_scheduler_meets_them() -> None:
    assert node_reason(job(), node(state=NodeState.LOST), True).reason.startswith("lost")
    assert node_reason(job(), node(), connected=False).reason.startswith("not connected")
    assert node_reason(job(), node(draining=True), True).reason.startswith("draining")
    big = node_reason(job(memory=8 * GIB), node(draining=False), True)
    assert big.reason == ("too small: the job asks 8.0G of memory a task, the node has 4.0G in all")
    assert node_reason(job(cpus=4), node(), True).reason.startswith("too small: the job asks 4")
    full = node_reason(job(), node(used_memory=int(3.5 * GIB)), True)
    assert full.reason == "not enough free memory: needs 1.0G, 512.0M free of 4.0G"
    busy = node_reason(job(), node(used_cpus=1.5), True)
    assert busy.reason == "not enough free CPUs: needs 1, 0.5 free of 2"
    room = node_reason(job(), node(), True)
    assert room.fits_now and room.reason == "has room for it"


def test_the_summary_says_what_holds_the_task_back() -> None:
    assert "no nodes yet" in explain_pending(job(), [], set(), 0, None, 0.0).summary
    never = explain_pending(job(memory=64 * GIB), [node("a"), node("b")], {"a", "b"}, 0, None, 0)
    assert "no node can ever run it" in never.summary and len(never.nodes) == 2
    queued = explain_pending(job(), [node()], {"n1"}, 12, None, 0.0)
    assert "12 queued tasks go first" in queued.summary
    backoff = explain_pending(job(), [node()], {"n1"}, 0, 100.0, 50.0)
    assert "retry backoff until" in backoff.summary
    full = explain_pending(job(), [node(used_cpus=2)], {"n1"}, 0, None, 0.0)
    assert "no node has room for it right now" in full.summary
