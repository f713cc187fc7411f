"""Reassignment, fencing and retries through the real service and a real SQLite store.

The clock is fake and agents are fake sessions whose outboxes the tests read, so every grace and
backoff is checked at its exact edge with no sleeps and no network.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import sqlite3
from pathlib import Path
from typing import Any, Literal

import pytest

from planetary_mesh.coordinator.service import CoordinatorService
from planetary_mesh.coordinator.sessions import AgentSession
from planetary_mesh.core.liveness import LivenessPolicy
from planetary_mesh.core.model import Attempt, Task
from planetary_mesh.core.states import AttemptState, JobState, NodeState, TaskState
from planetary_mesh.pki import certs
from planetary_mesh.protocol import (
    LOG_MARKER_ROOM,
    MAX_LOG_BYTES,
    Ended,
    Hello,
    JobSubmit,
    Log,
    Report,
    Started,
)
from planetary_mesh.store.sqlite import SQLiteStore

MIB = 2**20
GIB = 2**30
Ref = tuple[int, int, int]  # (task_id, attempt, epoch)
EndKind = Literal["exited", "signalled", "timeout", "cancelled", "sandbox_error"]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@functools.cache
def mesh_ca() -> tuple[Any, Any]:
    return certs.create_ca("test")


def new_service(path: Path, clock: FakeClock, **kwargs: Any) -> CoordinatorService:
    ca_cert, ca_key = mesh_ca()
    return CoordinatorService(SQLiteStore(path), ca_cert, ca_key, clock=clock, **kwargs)


def hello(
    node_id: str, cpus: float, memory: int = 64 * GIB, held: list[Ref] | None = None
) -> Hello:
    return Hello(
        type="hello",
        name=node_id,
        cpus=cpus,
        memory=memory,
        sandbox="plain",
        version="test",
        held=list(held or []),
    )


def join(
    service: CoordinatorService, node_id: str, cpus: float = 1, memory: int = 64 * GIB
) -> AgentSession:
    service.store.add_node(node_id, node_id, 1, service.clock())
    return service.agent_connected(node_id, hello(node_id, cpus, memory))


def messages(session: AgentSession) -> list[dict[str, Any] | None]:
    out = []
    while not session.outbox.empty():
        out.append(session.outbox.get_nowait())
    return out


def assigned(session: AgentSession) -> list[Ref]:
    """The attempts sent to ``session`` since last read (other messages are dropped)."""
    refs: list[Ref] = []
    for message in messages(session):
        if message is not None and message["type"] == "assign":
            refs += [(t[0], t[1], t[2]) for t in message["tasks"]]
    return refs


def submit(
    service: CoordinatorService, count: int = 1, cpus: float = 1, memory: int = MIB, **kw: Any
) -> str:
    body = JobSubmit(argv=["true"], count=count, cpus=cpus, memory=memory, **kw)
    return service.submit("alice", body).id


def ended(ref: Ref, exit_code: int = 0, end: EndKind = "exited") -> Ended:
    return Ended(
        kind="ended",
        task=ref,
        end=end,
        exit_code=exit_code if end == "exited" else None,
        signal=None,
        message=f"{end} {exit_code}",
    )


_seq = 0


def report(service: CoordinatorService, session: AgentSession, *events: Ended | Started) -> None:
    """What the app does with a message from an agent: a heartbeat, then the report."""
    global _seq
    _seq += 1
    service.agent_heard(session)
    service.agent_report(session, Report(type="report", seq=_seq, events=list(events)))


def task_of(service: CoordinatorService, job_id: str, index: int = 0) -> Task:
    task = service.store.task(job_id, index)
    assert task is not None
    return task


def attempts_of(service: CoordinatorService, job_id: str, index: int = 0) -> list[Attempt]:
    return service.store.attempts(task_of(service, job_id, index).id)


def ref_of(task: Task) -> Ref:
    return (task.id, task.attempt, task.epoch)


def node_state(service: CoordinatorService, node_id: str) -> NodeState:
    (node,) = [n for n in service.store.nodes() if n.id == node_id]
    return node.state


def event_kinds(service: CoordinatorService) -> list[str]:
    return [e.kind for e in service.store.events()]


def fail_store_calls(
    monkeypatch: pytest.MonkeyPatch, service: CoordinatorService, method: str, times: int
) -> None:
    """Make the store's ``method`` raise a store error ``times`` times, then work again."""
    real = getattr(service.store, method)
    failures = iter([sqlite3.OperationalError("database or disk is full")] * times)

    def failing(*args: Any, **kwargs: Any) -> Any:
        for error in failures:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(service.store, method, failing)


def task_on_a_then_a_disconnects(
    service: CoordinatorService, clock: FakeClock
) -> tuple[AgentSession, str, Ref]:
    """A task placed on "n-a", then "n-b" joins and n-a's session closes, its grace over:
    node b's session, the job and the task's first attempt."""
    a = join(service, "n-a", cpus=1)
    job = submit(service)
    service.schedule_round()
    (ref,) = assigned(a)
    b = join(service, "n-b", cpus=1)
    service.agent_disconnected(a)
    clock.advance(0.5)
    return b, job, ref


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service(tmp_path: Path, clock: FakeClock) -> CoordinatorService:
    return new_service(tmp_path / "mesh.db", clock)


# -- a node whose session closes ----------------------------------------------------------------


def test_a_disconnected_node_is_suspect_at_once_and_its_tasks_move_after_the_grace(
    service: CoordinatorService, clock: FakeClock
) -> None:
    a = join(service, "n-a")
    job = submit(service)
    service.schedule_round()
    (first,) = assigned(a)

    service.agent_disconnected(a)
    assert node_state(service, "n-a") is NodeState.SUSPECT
    clock.advance(0.499)
    service.check_liveness()
    assert task_of(service, job).state is TaskState.ASSIGNED  # kept within the grace
    assert node_state(service, "n-a") is NodeState.SUSPECT

    clock.advance(0.001)  # exactly 0.5 s after the session closed
    service.check_liveness()
    assert node_state(service, "n-a") is NodeState.LOST
    task = task_of(service, job)
    assert task.state is TaskState.PENDING and task.node_id is None
    (attempt,) = attempts_of(service, job)
    assert attempt.state is AttemptState.LOST and attempt.number == first[1]
    assert attempt.reason is not None and "node lost" in attempt.reason
    assert "node_lost" in event_kinds(service)


def test_lost_work_goes_first_and_does_not_count_against_retries(
    service: CoordinatorService, clock: FakeClock
) -> None:
    # "big" fits the old job's tasks, "small" only the small ones, so the old job keeps a task
    # pending while a newer job runs on "small".
    big = join(service, "n-big", cpus=1, memory=64 * GIB)
    small = join(service, "n-small", cpus=1, memory=1 * GIB)
    old = submit(service, count=2, memory=2 * GIB)
    lost = submit(service, retries=0)
    service.schedule_round()
    (old_ref,) = assigned(big)
    (lost_ref,) = assigned(small)
    assert old_ref[0] == task_of(service, old, 0).id and lost_ref[0] == task_of(service, lost).id
    assert task_of(service, old, 1).state is TaskState.PENDING

    service.agent_disconnected(small)
    clock.advance(0.5)
    service.check_liveness()
    assert task_of(service, lost).state is TaskState.PENDING
    newer = submit(service)  # newer pending work, submitted after the loss
    clock.advance(2.0)  # the old job's task runs 2.5 s: not short, so nothing is prefetched
    service.agent_heard(big)

    # "big" frees up: the task taken back from the lost node goes ahead of both the older
    # job's pending task and the newer job.
    report(service, big, ended(old_ref))
    service.schedule_round()
    (moved,) = assigned(big)
    assert moved[0] == lost_ref[0] and moved[1] == 2 and moved[2] > lost_ref[2]
    assert task_of(service, old, 1).state is TaskState.PENDING
    assert task_of(service, newer).state is TaskState.PENDING

    # retries=0, yet the loss did not use its one try: it still succeeds on "big".
    report(service, big, ended(moved))
    assert task_of(service, lost).state is TaskState.SUCCEEDED
    assert service.job(lost).state is JobState.SUCCEEDED
    assert [(a.number, a.node_id, a.state) for a in attempts_of(service, lost)] == [
        (1, "n-small", AttemptState.LOST),
        (2, "n-big", AttemptState.SUCCEEDED),
    ]
    # The older job's pending task is next, then the newer job.
    service.schedule_round()
    (after,) = assigned(big)
    assert after[0] == task_of(service, old, 1).id


def test_a_requeued_task_goes_to_another_node(
    service: CoordinatorService, clock: FakeClock
) -> None:
    b, job, ref = task_on_a_then_a_disconnects(service, clock)
    service.check_liveness()
    service.schedule_round()
    (moved,) = assigned(b)
    assert moved[0] == ref[0] and moved[1] == ref[1] + 1
    assert task_of(service, job).node_id == "n-b"


def test_a_node_loss_whose_commit_fails_is_retried_and_strands_nothing(
    service: CoordinatorService, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store error while a node is declared lost (a full disk, say) must not leave the node
    lost with its work still on it: it is declared lost again, and its work moved, next tick."""
    b, job, ref = task_on_a_then_a_disconnects(service, clock)
    fail_store_calls(monkeypatch, service, "requeue_node_attempts", times=1)
    service.check_liveness()
    # Nothing of the loss was kept: the node is not lost, its task is where it was.
    assert node_state(service, "n-a") is NodeState.SUSPECT
    assert task_of(service, job).state is TaskState.ASSIGNED
    assert "node_lost" not in event_kinds(service)

    clock.advance(0.1)
    service.check_liveness()  # the next tick
    assert node_state(service, "n-a") is NodeState.LOST
    service.schedule_round()
    (moved,) = assigned(b)
    assert moved[0] == ref[0] and moved[1] == ref[1] + 1


# -- a node that goes silent --------------------------------------------------------------------


def test_a_silent_node_is_suspect_then_lost_and_its_session_is_closed(
    service: CoordinatorService, clock: FakeClock
) -> None:
    a = join(service, "n-a", cpus=1)
    b = join(service, "n-b", cpus=1)
    job = submit(service)
    service.schedule_round()
    (ref,) = assigned(a) + assigned(b)
    victim, survivor = (a, b) if task_of(service, job).node_id == "n-a" else (b, a)

    for _ in range(2):  # the survivor keeps beating; the victim says nothing
        clock.advance(1.0)
        service.agent_heard(survivor)
        service.check_liveness()
    clock.advance(0.999)
    service.agent_heard(survivor)
    service.check_liveness()
    assert node_state(service, victim.node_id) is NodeState.READY  # 2.999 s: not yet

    clock.advance(0.001)  # 3 missed beats
    service.check_liveness()
    assert node_state(service, victim.node_id) is NodeState.SUSPECT
    assert node_state(service, survivor.node_id) is NodeState.READY
    assert task_of(service, job).state is TaskState.ASSIGNED  # a suspect node keeps its work
    assert not victim.closed

    clock.advance(0.999)
    service.agent_heard(survivor)
    service.check_liveness()
    assert task_of(service, job).state is TaskState.ASSIGNED  # 3.999 s

    clock.advance(0.001)  # 4 s of silence
    service.check_liveness()
    assert node_state(service, victim.node_id) is NodeState.LOST
    assert victim.closed and messages(victim)[-1] is None  # the app closes the connection
    assert task_of(service, job).state is TaskState.PENDING
    service.schedule_round()
    (moved,) = assigned(survivor)
    assert moved[0] == ref[0] and moved[1] == 2
    assert task_of(service, job).node_id == survivor.node_id


def test_liveness_runs_on_a_monotonic_clock_not_the_wall_clock(tmp_path: Path) -> None:
    """The machine's clock may step (NTP, a VM resumed): a step forward must not declare every
    node lost, nor a step back keep a silent node alive; only time that passed counts."""
    wall, ticks = FakeClock(), FakeClock(50.0)
    service = new_service(tmp_path / "mesh.db", wall, ticks=ticks)
    a = join(service, "n-a", cpus=1)
    b = join(service, "n-b", cpus=1)
    job = submit(service)
    service.schedule_round()
    victim, survivor = (a, b) if task_of(service, job).node_id == "n-a" else (b, a)

    wall.advance(3600.0)  # the wall clock jumps an hour ahead; no time passed
    service.check_liveness()
    assert node_state(service, "n-a") is NodeState.READY
    assert node_state(service, "n-b") is NodeState.READY

    wall.advance(-7200.0)  # and an hour behind where it was
    for _ in range(4):  # 4 s pass: the survivor beats, the victim is silent
        ticks.advance(1.0)
        wall.advance(1.0)
        service.agent_heard(survivor)
        service.check_liveness()
    assert node_state(service, victim.node_id) is NodeState.LOST
    assert node_state(service, survivor.node_id) is NodeState.READY
    assert task_of(service, job).state is TaskState.PENDING
    # What is stored is wall time: when the victim was last heard, by the wall clock.
    (lost,) = [n for n in service.store.nodes() if n.id == victim.node_id]
    assert lost.last_seen == pytest.approx(wall.now - 4.0)


def test_a_suspect_node_that_is_heard_again_is_ready(
    service: CoordinatorService, clock: FakeClock
) -> None:
    a = join(service, "n-a")
    job = submit(service)
    service.schedule_round()
    clock.advance(3.0)
    service.check_liveness()
    assert node_state(service, "n-a") is NodeState.SUSPECT
    service.agent_heard(a)
    assert node_state(service, "n-a") is NodeState.READY
    clock.advance(3.5)  # 3.5 s since it was heard: below the 4 s limit
    service.check_liveness()
    assert task_of(service, job).state is TaskState.ASSIGNED
    assert "node_back" in event_kinds(service)


def test_a_late_result_from_a_lost_node_is_refused_and_recorded(
    service: CoordinatorService, clock: FakeClock
) -> None:
    a = join(service, "n-a")
    b = join(service, "n-b")
    job = submit(service, retries=0)
    service.schedule_round()
    (old,) = assigned(a) + assigned(b)
    victim_id = task_of(service, job).node_id
    assert victim_id is not None
    victim, survivor = (a, b) if victim_id == "n-a" else (b, a)
    report(service, victim, Started(kind="started", task=old))

    clock.advance(5.0)  # silent for 5 s: lost (the survivor is heard)
    service.agent_heard(survivor)
    service.check_liveness()
    assert node_state(service, victim_id) is NodeState.LOST
    service.schedule_round()
    (new,) = assigned(survivor)
    report(service, survivor, Started(kind="started", task=new))
    before = task_of(service, job)
    assert before.state is TaskState.RUNNING and before.attempt == 2

    # The frozen agent wakes up and comes back still holding its old attempt, then reports it.
    back = service.agent_connected(victim_id, hello(victim_id, 1, held=[old]))
    cancels = [m for m in messages(back) if m is not None and m["type"] == "cancel"]
    assert [tuple(t) for c in cancels for t in c["tasks"]] == [old]
    report(service, back, ended(old, exit_code=0))

    assert task_of(service, job) == before  # nothing about the task changed
    first, second = attempts_of(service, job)
    assert first.state is AttemptState.LOST and first.late_result is not None
    assert "refused" in first.late_result
    assert second.state is AttemptState.RUNNING and second.late_result is None
    late = [e for e in service.store.events() if e.kind == "late_result"]
    assert len(late) == 1 and late[0].node_id == victim_id

    # A failure reported late is refused the same way: it burns no retry of retries=0.
    report(service, back, ended(old, exit_code=1))
    assert task_of(service, job) == before
    report(service, survivor, ended(new))
    assert task_of(service, job).state is TaskState.SUCCEEDED


def test_a_result_for_another_nodes_attempt_is_refused(
    service: CoordinatorService, clock: FakeClock
) -> None:
    a = join(service, "n-a")
    b = join(service, "n-b")
    job = submit(service)
    service.schedule_round()
    (ref,) = assigned(a) + assigned(b)
    other = b if task_of(service, job).node_id == "n-a" else a
    report(service, other, ended(ref))  # right attempt and epoch, wrong node
    assert task_of(service, job).state is TaskState.ASSIGNED
    assert "late_result" in event_kinds(service)


# -- a blip: the session drops and comes back within the grace ---------------------------------


def test_a_blip_with_held_attempts_keeps_them(
    service: CoordinatorService, clock: FakeClock
) -> None:
    a = join(service, "n-a", cpus=2)
    job = submit(service, count=2)
    service.schedule_round()
    refs = assigned(a)
    assert len(refs) == 2
    report(service, a, Started(kind="started", task=refs[0]))

    service.agent_disconnected(a)
    clock.advance(0.3)
    service.check_liveness()
    back = service.agent_connected("n-a", hello("n-a", 2, held=refs))
    clock.advance(0.3)  # past the 0.5 s since the drop: the node is back, nothing is lost
    service.check_liveness()

    assert node_state(service, "n-a") is NodeState.READY
    assert [task_of(service, job, i).state for i in (0, 1)] == [
        TaskState.RUNNING,
        TaskState.ASSIGNED,
    ]
    for i in (0, 1):
        (attempt,) = attempts_of(service, job, i)
        assert attempt.number == 1 and attempt.node_id == "n-a"
    assert not [m for m in messages(back) if m is not None and m["type"] == "cancel"]
    report(service, back, ended(refs[0]), ended(refs[1]))
    assert service.job(job).state is JobState.SUCCEEDED


def test_a_reconnect_without_held_attempts_requeues_them_at_once(
    service: CoordinatorService, clock: FakeClock
) -> None:
    a = join(service, "n-a", cpus=2)
    job = submit(service, count=2)
    service.schedule_round()
    refs = assigned(a)
    service.agent_disconnected(a)
    clock.advance(0.1)
    # It comes back holding only one of them (the other never reached it).
    back = service.agent_connected("n-a", hello("n-a", 2, held=[refs[1]]))
    assert task_of(service, job, 0).state is TaskState.PENDING  # no waiting for the grace
    assert task_of(service, job, 1).state is TaskState.ASSIGNED
    (lost,) = attempts_of(service, job, 0)
    assert lost.state is AttemptState.LOST
    service.schedule_round()
    (again,) = assigned(back)
    assert again[0] == refs[0][0] and again[1] == 2


# -- retries with backoff -----------------------------------------------------------------------


def test_a_failing_task_backs_off_then_fails_with_every_attempt_kept(tmp_path: Path) -> None:
    clock = FakeClock()
    service = new_service(tmp_path / "mesh.db", clock, retry_backoff=(1.0, 60.0))
    a = join(service, "n-a")
    job = submit(service, retries=2)
    service.schedule_round()
    (first,) = assigned(a)
    report(service, a, ended(first, exit_code=3))
    assert task_of(service, job).state is TaskState.PENDING
    assert service.store.next_retry_time() == clock.now + 1.0

    clock.advance(0.999)
    assert service.schedule_round() == 0
    clock.advance(0.001)  # 1 s after the first failure
    assert service.schedule_round() == 1
    (second,) = assigned(a)
    assert second[0] == first[0] and second[1] == 2

    report(service, a, ended(second, end="timeout"))  # a timeout counts too
    clock.advance(1.999)
    assert service.schedule_round() == 0
    clock.advance(0.001)  # 2 s after the second failure
    assert service.schedule_round() == 1
    (third,) = assigned(a)
    assert third[1] == 3

    report(service, a, ended(third, exit_code=3))
    task = task_of(service, job)
    assert task.state is TaskState.FAILED and task.exit_code == 3
    assert service.job(job).state is JobState.FAILED
    history = attempts_of(service, job)
    assert [(h.number, h.state) for h in history] == [
        (1, AttemptState.FAILED),
        (2, AttemptState.FAILED),
        (3, AttemptState.FAILED),
    ]
    assert history[0].exit_code == 3 and history[2].exit_code == 3
    clock.advance(3600)
    assert service.schedule_round() == 0  # failed for good


def test_a_node_loss_between_failures_does_not_use_a_retry(
    service: CoordinatorService, clock: FakeClock
) -> None:
    a = join(service, "n-a")
    job = submit(service, retries=1)
    service.schedule_round()
    (first,) = assigned(a)
    report(service, a, ended(first, exit_code=1))  # uses the one retry
    clock.advance(1.0)
    service.schedule_round()
    (second,) = assigned(a)
    assert second[1] == 2
    service.agent_disconnected(a)
    clock.advance(0.5)
    service.check_liveness()  # lost: free
    assert task_of(service, job).state is TaskState.PENDING
    b = join(service, "n-b")
    service.schedule_round()  # no backoff after a loss
    (third,) = assigned(b)
    assert third[1] == 3
    report(service, b, ended(third, exit_code=1))  # the second counted failure: out of retries
    assert task_of(service, job).state is TaskState.FAILED
    states = [h.state for h in attempts_of(service, job)]
    assert states == [AttemptState.FAILED, AttemptState.LOST, AttemptState.FAILED]


# -- coordinator restart ------------------------------------------------------------------------


def test_after_a_restart_nodes_get_a_grace_then_are_lost_or_adopted(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "mesh.db"
    policy = LivenessPolicy(restart_grace=10.0)
    first = new_service(path, clock, policy=policy)
    a = join(first, "n-a")
    b = join(first, "n-b")
    job = submit(first, count=2)
    first.schedule_round()
    held_a, held_b = assigned(a), assigned(b)
    assert len(held_a) == 1 and len(held_b) == 1
    report(first, a, Started(kind="started", task=held_a[0]))

    # kill -9: no goodbye, the old service and its sessions are simply gone.
    clock.advance(2.0)
    service = new_service(path, clock, policy=policy)
    assert node_state(service, "n-a") is NodeState.SUSPECT
    assert node_state(service, "n-b") is NodeState.SUSPECT
    service.check_liveness()
    clock.advance(9.999)
    service.check_liveness()
    assert node_state(service, "n-b") is NodeState.SUSPECT  # still within the grace
    assert task_of(service, job, 1).state is TaskState.ASSIGNED

    # "n-a" comes back with what it runs: adopted, not restarted.
    back = service.agent_connected("n-a", hello("n-a", 1, held=held_a))
    assert not [m for m in messages(back) if m is not None and m["type"] == "cancel"]

    clock.advance(0.001)  # the grace is over: "n-b" never came back
    service.check_liveness()
    assert node_state(service, "n-b") is NodeState.LOST
    assert node_state(service, "n-a") is NodeState.READY
    adopted = task_of(service, job, 0)
    assert adopted.state is TaskState.RUNNING and ref_of(adopted) == held_a[0]
    (attempt,) = attempts_of(service, job, 0)
    assert attempt.number == 1 and attempt.state is AttemptState.RUNNING
    assert task_of(service, job, 1).state is TaskState.PENDING

    report(service, back, ended(held_a[0]))  # the adopted attempt's result counts
    assert task_of(service, job, 0).state is TaskState.SUCCEEDED
    service.schedule_round()
    (moved,) = assigned(back)
    assert moved[0] == held_b[0][0] and moved[1] == 2
    assert moved[2] > held_b[0][2]  # epochs stay unique across the restart


def test_after_a_restart_a_node_that_lost_its_work_gets_it_requeued(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "mesh.db"
    first = new_service(path, clock)
    a = join(first, "n-a")
    job = submit(first)
    first.schedule_round()
    (ref,) = assigned(a)
    service = new_service(path, clock)
    back = service.agent_connected("n-a", hello("n-a", 1, held=[]))
    assert task_of(service, job).state is TaskState.PENDING
    service.schedule_round()
    (again,) = assigned(back)
    assert again[0] == ref[0] and again[1] == 2


# -- drain --------------------------------------------------------------------------------------


def test_drain_stops_new_placements_lets_running_work_finish_and_undrain_resumes(
    service: CoordinatorService, clock: FakeClock
) -> None:
    a = join(service, "n-a", cpus=2)
    running = submit(service)
    service.schedule_round()
    (ref,) = assigned(a)

    service.drain("n-a", deadline=None, by="admin")
    waiting = submit(service)
    service.schedule_round()
    assert assigned(a) == []
    assert task_of(service, waiting).state is TaskState.PENDING
    clock.advance(3600)
    service.agent_heard(a)
    service.check_liveness()  # no deadline: nothing is handed back, however long
    assert task_of(service, running).state is TaskState.ASSIGNED

    report(service, a, ended(ref))
    assert task_of(service, running).state is TaskState.SUCCEEDED
    service.schedule_round()
    assert assigned(a) == []

    service.undrain("n-a", by="admin")
    service.schedule_round()
    (placed,) = assigned(a)
    assert placed[0] == task_of(service, waiting).id
    kinds = event_kinds(service)
    assert "node_drain" in kinds and "node_undrain" in kinds


def test_past_the_drain_deadline_work_is_handed_back_without_using_retries(
    service: CoordinatorService, clock: FakeClock
) -> None:
    a = join(service, "n-a", cpus=2)
    job = submit(service, count=2, retries=0)
    service.schedule_round()
    refs = assigned(a)
    report(service, a, Started(kind="started", task=refs[0]))

    service.drain("n-a", deadline=30.0, by="admin")
    clock.advance(29.999)
    service.agent_heard(a)
    service.check_liveness()
    assert [task_of(service, job, i).state for i in (0, 1)] == [
        TaskState.RUNNING,
        TaskState.ASSIGNED,
    ]
    assert not [m for m in messages(a) if m is not None and m["type"] == "cancel"]

    clock.advance(0.001)
    service.check_liveness()
    for i in (0, 1):
        assert task_of(service, job, i).state is TaskState.PENDING
        (attempt,) = attempts_of(service, job, i)
        assert attempt.state is AttemptState.LOST
        assert attempt.reason is not None and "drain deadline" in attempt.reason
    (cancel,) = [m for m in messages(a) if m is not None and m["type"] == "cancel"]
    assert sorted(tuple(t) for t in cancel["tasks"]) == sorted(refs)
    assert "reassigned" in event_kinds(service)
    assert node_state(service, "n-a") is NodeState.READY  # drained, not lost

    # The drained node's late results are refused; elsewhere the tasks run with retries=0 intact.
    report(service, a, ended(refs[0]))
    assert task_of(service, job, 0).state is TaskState.PENDING
    b = join(service, "n-b", cpus=2)
    service.schedule_round()
    assert assigned(a) == []
    moved = assigned(b)
    assert sorted(r[1] for r in moved) == [2, 2]
    report(service, b, *(ended(r) for r in moved))
    assert service.job(job).state is JobState.SUCCEEDED


# -- suspect nodes and resent results ----------------------------------------------------------


def test_a_silent_suspect_node_gets_no_new_work(
    service: CoordinatorService, clock: FakeClock
) -> None:
    # Only a ready node takes work: one that stopped answering would sit on it until it is
    # declared lost, and the work would start late elsewhere.
    a = join(service, "n-a", cpus=4)
    clock.advance(3.0)  # silent for 3 beats
    service.check_liveness()
    assert node_state(service, "n-a") is NodeState.SUSPECT
    job = submit(service)
    service.schedule_round()
    assert assigned(a) == []
    assert task_of(service, job).state is TaskState.PENDING


def test_a_resent_result_is_not_recorded_as_a_late_one(
    service: CoordinatorService, clock: FakeClock
) -> None:
    a = join(service, "n-a")
    job = submit(service)
    service.schedule_round()
    (ref,) = assigned(a)
    report(service, a, ended(ref))
    # Agents resend results until acked, so a duplicate of a committed result is normal
    # traffic, not a refused late result.
    # The ack was lost (the connection dropped): the agent comes back and sends it again.
    service.agent_disconnected(a)
    back = service.agent_connected("n-a", hello("n-a", 1, held=[ref]))
    report(service, back, ended(ref))
    (attempt,) = attempts_of(service, job)
    assert attempt.state is AttemptState.SUCCEEDED
    assert attempt.late_result is None
    assert "late_result" not in event_kinds(service)


def test_an_attempts_stored_output_is_bounded_whatever_the_agent_sends(
    service: CoordinatorService,
) -> None:
    session = join(service, "n1")
    job_id = submit(service)
    service.schedule_round()
    (ref,) = assigned(session)
    limit = MAX_LOG_BYTES + LOG_MARKER_ROOM

    def log(offset: int, data: bytes) -> Log:
        return Log(kind="log", task=ref, offset=offset, data=base64.b64encode(data).decode())

    global _seq
    _seq += 1
    events = [log(0, b"start\n"), log(limit - 4, b"12345678"), log(limit + 10, b"way past")]
    service.agent_report(session, Report(type="report", seq=_seq, events=[*events, ended(ref)]))
    task_id, attempt = service.task_id(job_id, 0)
    stored, _ = service.store.logs(task_id, attempt, limit - 4)
    assert stored == b"1234"  # cut at the bound; the chunk beyond it is not stored at all
    assert service.store.logs(task_id, attempt, 0)[0].startswith(b"start\n")


# -- the scheduler loop -------------------------------------------------------------------------


def test_a_failed_scheduling_round_is_retried_without_waiting_for_another_kick(
    service: CoordinatorService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round that fails (a store error) spends the kick that asked for it; in a quiet mesh
    none may follow, so the loop must try again by itself or the queue waits for ever."""
    a = join(service, "n-a", cpus=1)
    fail_store_calls(monkeypatch, service, "assign", times=2)
    job = submit(service)  # its own placement fails (1), and kicks the loop
    assert task_of(service, job).state is TaskState.PENDING

    async def scenario() -> None:
        loop = asyncio.create_task(service.run_scheduler(retry_after=0.05))
        try:
            async with asyncio.timeout(10):
                while task_of(service, job).state is not TaskState.ASSIGNED:
                    await asyncio.sleep(0.01)  # the kicked round fails too (2); nothing kicks
        finally:
            loop.cancel()

    asyncio.run(scenario())
    (ref,) = assigned(a)
    assert ref[0] == task_of(service, job).id
