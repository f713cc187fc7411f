"""Function jobs in the coordinator: calls travel with their tasks to the agent, results come back
in reports, and a caller follows them from a cursor. Real SQLite, real service, no network."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from service_helpers import MIB, connect, make_service, messages

from planetary_mesh.coordinator import service as service_module
from planetary_mesh.errors import RequestRejected
from planetary_mesh.protocol import CallsAdd, FunctionSubmit, JobSubmit, Report


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _functions(calls: list[bytes], **options: Any) -> FunctionSubmit:
    return FunctionSubmit(python="3.11", calls=[_b64(c) for c in calls], **options)


def _report(seq: int, *events: dict[str, Any]) -> Report:
    return Report.model_validate_json(
        json.dumps({"type": "report", "seq": seq, "events": list(events)})
    )


def _ended(task: list[int], exit_code: int, result: bytes | None, end: str = "exited") -> Any:
    return {
        "kind": "ended",
        "task": task,
        "end": end,
        "exit_code": exit_code if end == "exited" else None,
        "signal": None,
        "message": "returned" if exit_code == 0 else "raised builtins.ValueError: no",
        "result": None if result is None else _b64(result),
    }


def test_calls_travel_with_their_tasks_and_results_come_back_in_order(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    node = connect(service, "n1", cpus=2)
    messages(node, "assign")
    job = service.submit_function("alice", _functions([b"call-0", b"call-1", b"call-2"]))
    assert job.spec.python == "3.11" and job.spec.count == 3

    (assign,) = messages(node, "assign")
    assert assign["jobs"][job.id]["python"] == "3.11"
    tasks = {row[4]: row for row in assign["tasks"]}  # by index
    assert sorted(tasks) == [0, 1]  # two CPUs: two calls placed, one waits
    for index, row in tasks.items():
        assert base64.b64decode(assign["calls"][str(row[0])]) == f"call-{index}".encode()

    seq = service.store.job_seq(job.id)
    assert seq is not None
    assert service.store.call_updates(seq, 0, 100, MIB) == []

    t0 = list(tasks[0][:3])
    service.agent_report(node, _report(1, {"kind": "started", "task": t0}))
    (running,) = service.store.call_updates(seq, 0, 100, MIB)
    assert (running.index, running.state.value, running.result) == (0, "running", None)

    service.agent_report(node, _report(2, _ended(t0, 0, b"result-0")))
    service.agent_report(node, _report(3, _ended(list(tasks[1][:3]), 1, b"error-record")))
    updates = service.store.call_updates(seq, running.changed, 100, MIB)
    assert [(u.index, u.state.value, u.end_kind, u.exit_code, u.result) for u in updates] == [
        (0, "succeeded", "exited", 0, b"result-0"),
        (1, "failed", "exited", 1, b"error-record"),
    ]
    # The freed room took the third call, with its payload.
    (assign,) = messages(node, "assign")
    ((task_id, *_rest, index),) = assign["tasks"]
    assert index == 2 and base64.b64decode(assign["calls"][str(task_id)]) == b"call-2"
    # Nothing new after the last cursor; a page limit keeps order.
    assert service.store.call_updates(seq, updates[-1].changed, 100, MIB) == []
    assert [u.index for u in service.store.call_updates(seq, 0, 1, MIB)] == [0]


def test_more_calls_join_the_same_job_and_only_its_owner_adds_them(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    job = service.submit_function("alice", _functions([b"a"]))
    first, count = service.add_calls(job.id, CallsAdd(calls=[_b64(b"b"), _b64(b"c")]), "alice")
    assert (first, count) == (1, 2)
    assert service.job(job.id).spec.count == 3
    assert [t.index for t in service.store.tasks(job.id)] == [0, 1, 2]

    with pytest.raises(RequestRejected, match="only the job's owner") as caught:
        service.add_calls(job.id, CallsAdd(calls=[_b64(b"d")]), "mallory")
    assert caught.value.status == 403
    command = service.submit("alice", JobSubmit(argv=["true"]))
    with pytest.raises(RequestRejected, match="runs a command") as caught:
        service.add_calls(command.id, CallsAdd(calls=[_b64(b"d")]), "alice")
    assert caught.value.status == 409
    service.cancel(job.id, "alice")
    with pytest.raises(RequestRejected, match="was cancelled") as caught:
        service.add_calls(job.id, CallsAdd(calls=[_b64(b"d")]), "alice")
    assert caught.value.status == 409
    with pytest.raises(RequestRejected, match="not valid base64") as caught:
        service.submit_function("alice", FunctionSubmit(python="3.11", calls=["@@@"]))
    assert caught.value.status == 422
    assert service.job(job.id).spec.count == 3  # nothing refused was added


def test_cancelling_some_calls_stops_queued_and_running_ones_only(tmp_path: Path) -> None:
    service = make_service(tmp_path)
    node = connect(service, "n1", cpus=1)
    job = service.submit_function("alice", _functions([b"0", b"1", b"2"]))
    (assign,) = messages(node, "assign")
    ((task_id, attempt, epoch, _job, index),) = assign["tasks"]
    assert index == 0

    with pytest.raises(RequestRejected, match="owner"):
        service.cancel_tasks(job.id, [0], "mallory", admin=False)
    service.cancel_tasks(job.id, [0, 2], "alice", admin=False)
    (cancel,) = messages(node, "cancel")
    assert cancel["tasks"] == [[task_id, attempt, epoch]]
    service.schedule_round()  # the freed CPU goes to the call that was not cancelled
    states = {t.index: t.state.value for t in service.store.tasks(job.id)}
    assert states == {0: "cancelled", 1: "assigned", 2: "cancelled"}
    seq = service.store.job_seq(job.id)
    assert seq is not None
    ended = service.store.call_updates(seq, 0, 100, MIB)
    assert sorted((u.index, u.state.value) for u in ended) == [(0, "cancelled"), (2, "cancelled")]
    # The killed attempt's own report changes nothing now.
    service.agent_report(node, _report(1, _ended([task_id, attempt, epoch], 0, b"late")))
    assert service.store.call_updates(seq, max(u.changed for u in ended), 100, MIB) == []


def test_large_calls_are_split_over_several_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "ASSIGN_MESSAGE_BYTES", 2500)
    service = make_service(tmp_path)
    node = connect(service, "n1", cpus=8)
    messages(node, "assign")
    job = service.submit_function("alice", _functions([bytes([i]) * 1000 for i in range(6)]))
    sent = messages(node, "assign")
    assert [len(m["tasks"]) for m in sent] == [2, 2, 2]
    assert job.id in sent[0]["jobs"] and not sent[1]["jobs"]  # the spec goes first
    calls = {row[4]: base64.b64decode(m["calls"][str(row[0])]) for m in sent for row in m["tasks"]}
    assert calls == {i: bytes([i]) * 1000 for i in range(6)}
