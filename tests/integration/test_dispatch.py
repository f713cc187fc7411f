"""The service places a 10,000-task array in batches: one message per node per round, not one
round trip per task; higher priority first, then oldest. Real SQLite, no network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service_helpers import MIB, connect, make_service

from planetary_mesh.coordinator.service import CoordinatorService
from planetary_mesh.coordinator.sessions import AgentSession
from planetary_mesh.core.prefetch import PREFETCH_MAX_DEPTH
from planetary_mesh.core.states import TaskState
from planetary_mesh.pki import certs
from planetary_mesh.protocol import JobSubmit, Report
from planetary_mesh.store.sqlite import SQLiteStore


def _drain(session: AgentSession) -> list[dict[str, Any]]:
    messages = []
    while not session.outbox.empty():
        message = session.outbox.get_nowait()
        if message is not None and message["type"] == "assign":
            messages.append(message)
    return messages


def test_a_10000_task_array_goes_out_in_one_message_per_node(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    job = service.submit("alice", JobSubmit(argv=["true"], count=10_000, cpus=0.1, memory=MIB))
    assert job.counts and sum(job.counts.values()) == 10_000
    a = connect(service, "n-a", cpus=100)
    b = connect(service, "n-b", cpus=50)
    _drain(a), _drain(b)

    service.schedule_round()

    to_a, to_b = _drain(a), _drain(b)
    assert len(to_a) == 1 and len(to_b) == 1
    assert len(to_a[0]["tasks"]) == 1000 and len(to_b[0]["tasks"]) == 500
    # The job's spec travels once per session, not once per task.
    assert list(to_a[0]["jobs"]) == [job.id]
    indexes = sorted(t[4] for t in to_a[0]["tasks"] + to_b[0]["tasks"])
    assert indexes == list(range(1500))  # oldest first: the lowest indexes went out
    nodes = {n.id: n for n in service.store.nodes()}
    assert nodes["n-a"].used_cpus <= 100 + 1e-6 and nodes["n-b"].used_cpus <= 50 + 1e-6

    # Nothing more fits: another round sends nothing and assigns nothing.
    service.schedule_round()
    assert _drain(a) == [] and _drain(b) == []
    counts = service.job(job.id).counts
    assert counts[TaskState.ASSIGNED] == 1500 and counts[TaskState.PENDING] == 8500


def test_higher_priority_goes_first_and_a_known_job_is_not_resent(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    low = service.submit("alice", JobSubmit(argv=["true"], count=4, cpus=1, memory=MIB))
    high = service.submit("bob", JobSubmit(argv=["true"], count=2, cpus=1, priority=5, memory=MIB))
    node = connect(service, "n-a", cpus=3)
    _drain(node)
    service.schedule_round()
    (first,) = _drain(node)
    assert [t[3] for t in first["tasks"]] == [high.id, high.id, low.id]
    assert set(first["jobs"]) == {high.id, low.id}

    # One of them ends: the next batch names the job without resending its spec.
    task_id, attempt, epoch = first["tasks"][2][:3]
    ended = {
        "kind": "ended",
        "task": [task_id, attempt, epoch],
        "end": "exited",
        "exit_code": 0,
        "signal": None,
        "message": "exit code 0",
    }
    report = Report.model_validate_json(json.dumps({"type": "report", "seq": 1, "events": [ended]}))
    service.agent_report(node, report)
    service.schedule_round()
    (second,) = _drain(node)
    assert second["jobs"] == {}
    # One for the freed CPU, and (its task proved short) the other two beyond the room.
    assert [t[3] for t in second["tasks"]] == [low.id] * 3


def test_small_work_behind_a_long_run_of_tasks_that_fit_nowhere_still_starts(
    tmp_path: Path,
) -> None:
    # The round reads the queue a page at a time; backfill must look past whole pages of
    # tasks too big for any node.
    service = make_service(tmp_path)
    big = service.submit("alice", JobSubmit(argv=["true"], count=1000, memory=1024**4))
    small = service.submit("bob", JobSubmit(argv=["true"], count=3, cpus=1.0, memory=MIB))
    node = connect(service, "n-a", cpus=2)
    _drain(node)
    service.schedule_round()
    (sent,) = _drain(node)
    assert [(t[3], t[4]) for t in sent["tasks"]] == [(small.id, 0), (small.id, 1)]
    assert service.job(big.id).counts == {TaskState.PENDING: 1000}


def test_a_lower_priority_job_waits_behind_a_higher_one_submitted_later(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    low = service.submit("alice", JobSubmit(argv=["true"], count=100, priority=0))
    high = service.submit("bob", JobSubmit(argv=["true"], count=2, priority=5))
    node = connect(service, "n-a", cpus=3)
    _drain(node)
    service.schedule_round()
    (sent,) = _drain(node)
    assert [(t[3], t[4]) for t in sent["tasks"]] == [(high.id, 0), (high.id, 1), (low.id, 0)]


def _report(seq: int, task: list[Any], kind: str) -> Report:
    """A report of one task's ``started`` or ``ended`` (exit code 0)."""
    event: dict[str, Any] = {"kind": kind, "task": task[:3]}
    if kind == "ended":
        event |= {"end": "exited", "exit_code": 0, "signal": None, "message": "exit code 0"}
    return Report.model_validate_json(json.dumps({"type": "report", "seq": seq, "events": [event]}))


def _clocked_service(tmp_path: Path, now: list[float]) -> CoordinatorService:
    ca_cert, ca_key = certs.create_ca("test")
    store = SQLiteStore(tmp_path / "mesh.db")
    return CoordinatorService(store, ca_cert, ca_key, clock=lambda: now[0])


def test_a_job_of_short_tasks_is_prefetched_and_a_long_one_is_not(tmp_path: Path) -> None:
    now = [1000.0]
    service = _clocked_service(tmp_path, now)
    short = service.submit("alice", JobSubmit(argv=["true"], count=50, cpus=1, memory=MIB))
    node = connect(service, "n-a", cpus=1)
    _drain(node)
    service.schedule_round()
    (first,) = _drain(node)
    assert len(first["tasks"]) == 1  # nothing known of the job yet: one task per free CPU

    # It started and ended within 5 ms: the room it freed is filled, and beyond the room the
    # node is handed more of this job so that its next task is already there.
    service.agent_report(node, _report(1, first["tasks"][0], "started"))
    now[0] += 0.005
    service.agent_report(node, _report(2, first["tasks"][0], "ended"))
    (second,) = _drain(node)
    assert len(second["tasks"]) == 1 + PREFETCH_MAX_DEPTH
    assert {t[3] for t in second["tasks"]} == {short.id}
    counts = service.job(short.id).counts
    assert counts[TaskState.ASSIGNED] == 1 + PREFETCH_MAX_DEPTH
    # People see the node full, not over-full.
    (seen,) = service.store.nodes()
    assert seen.used_cpus == 1 and seen.running == 1 + PREFETCH_MAX_DEPTH

    # A job whose tasks take seconds gets one task per free CPU only, even on a node that
    # still has prefetch room for the short job.
    service.cancel(short.id, "alice")
    _drain(node)
    long = service.submit("alice", JobSubmit(argv=["true"], count=50, cpus=1, memory=MIB))
    service.schedule_round()
    (third,) = _drain(node)
    assert len(third["tasks"]) == 1 and third["tasks"][0][3] == long.id
    service.agent_report(node, _report(3, third["tasks"][0], "started"))
    now[0] += 5.0
    service.agent_report(node, _report(4, third["tasks"][0], "ended"))
    (fourth,) = _drain(node)
    assert len(fourth["tasks"]) == 1
