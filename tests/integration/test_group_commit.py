"""Agents' reports that reach the coordinator in the same turn of its event loop are committed
together (one transaction, one fsync, one placement round), and each is acknowledged only once
committed. Real SQLite, sessions made by hand (no network)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service_helpers import MIB, connect, make_service, messages

from planetary_mesh.coordinator.service import CoordinatorService
from planetary_mesh.coordinator.sessions import AgentSession
from planetary_mesh.core.states import TaskState
from planetary_mesh.protocol import Ended, JobSubmit, Log, Report, Started

Ref = tuple[int, int, int]


def assigned(session: AgentSession) -> list[Ref]:
    return [(t[0], t[1], t[2]) for m in messages(session, "assign") for t in m["tasks"]]


def done(ref: Ref) -> list[Started | Log | Ended]:
    return [
        Started(kind="started", task=ref),
        Ended(kind="ended", task=ref, end="exited", exit_code=0, signal=None, message="ok"),
    ]


def count_commits(service: CoordinatorService) -> list[int]:
    """How many commits the store makes from now on (a one-element counter)."""
    counter = [0]
    notify = service.store.on_commit

    def counted() -> None:
        counter[0] += 1
        if notify is not None:
            notify()

    service.store.on_commit = counted
    return counter


def two_nodes_running(tmp_path: Path) -> tuple[CoordinatorService, AgentSession, AgentSession, str]:
    service = make_service(tmp_path)
    a, b = connect(service, "node-a", 1), connect(service, "node-b", 1)
    job = service.submit("alice", JobSubmit(argv=["true"], count=4, cpus=1, memory=MIB)).id
    return service, a, b, job


def test_reports_read_in_one_turn_share_one_commit_and_each_is_acknowledged(
    tmp_path: Path,
) -> None:
    service, a, b, job = two_nodes_running(tmp_path)
    [on_a], [on_b] = assigned(a), assigned(b)
    commits = count_commits(service)

    async def one_turn() -> None:
        service.agent_report_soon(a, Report(type="report", seq=1, events=done(on_a)))
        service.agent_report_soon(b, Report(type="report", seq=7, events=done(on_b)))
        # Nothing is committed, so nothing acknowledged, before the loop's next turn.
        assert service.store.task(job, 0).state is TaskState.ASSIGNED  # type: ignore[union-attr]
        await asyncio.sleep(0)

    a_acks, b_acks = messages(a, "ack"), messages(b, "ack")
    assert a_acks == b_acks == []
    asyncio.run(one_turn())
    assert commits[0] == 1  # both reports and the placement of the freed room: one commit
    assert [m["seq"] for m in messages(a, "ack")] == [1]
    assert [m["seq"] for m in messages(b, "ack")] == [7]
    states = [service.store.task(job, i).state for i in range(4)]  # type: ignore[union-attr]
    assert states.count(TaskState.SUCCEEDED) == 2
    assert states.count(TaskState.ASSIGNED) == 2  # the freed room was filled in that commit


def test_a_report_of_a_session_closed_before_the_commit_is_neither_kept_nor_acknowledged(
    tmp_path: Path,
) -> None:
    service, a, b, job = two_nodes_running(tmp_path)
    [on_a], [on_b] = assigned(a), assigned(b)

    async def one_turn() -> None:
        service.agent_report_soon(a, Report(type="report", seq=1, events=done(on_a)))
        service.agent_report_soon(b, Report(type="report", seq=1, events=done(on_b)))
        b.close()  # replaced by a newer session, say: its agent sends the report again there
        await asyncio.sleep(0)

    asyncio.run(one_turn())
    assert [m["seq"] for m in messages(a, "ack")] == [1]
    assert messages(b, "ack") == []
    states = [service.store.task(job, i).state for i in range(4)]  # type: ignore[union-attr]
    assert states.count(TaskState.SUCCEEDED) == 1  # a's only
