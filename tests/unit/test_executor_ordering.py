"""MeshExecutor's bookkeeping when the mesh is quicker than the client: a call added to a job can
start and end, and the job's follower hear of it, before the sender thread has filed the answer
that names the call's index. The update must reach the future all the same.

The client here is a scripted stand-in (the order of two threads is the logic under test); the
real mesh's version of this race is in tests/e2e/test_python_apis.py's joblib tests."""

from __future__ import annotations

import base64
import pickle
import threading
from typing import Any, cast

from planetary_mesh.client.client import Client
from planetary_mesh.client.executor import MeshExecutor
from planetary_mesh.protocol import CallsAdded, CallUpdate, CallUpdates, FunctionSubmit

WAIT_S = 10.0


def _ended(index: int, value: object) -> CallUpdate:
    return CallUpdate(
        index=index, state="succeeded", end="exited", exit_code=0, reason="returned",
        result=base64.b64encode(pickle.dumps(value)).decode(),
    )  # fmt: skip


class _QuickMesh:
    """Answers adding call 1 only once the follower has been told, and has taken in, that it
    already ended."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.pending: list[CallUpdate] = []
        self.cursor = 0
        self.asked_after: list[int] = []  # the cursors the follower asked from

    def submit_functions(self, spec: FunctionSubmit) -> Any:
        return type("Info", (), {"id": "job-1"})()

    def add_calls(self, job_id: str, calls: list[str]) -> CallsAdded:
        with self.lock:
            self.pending.append(_ended(1, "quick"))
            past = self.cursor + len(self.pending)
            self.lock.notify_all()
            # The follower has handled that update once it asks again from past it.
            heard = self.lock.wait_for(lambda: max(self.asked_after) >= past, WAIT_S)
        assert heard, "the follower never came back for more"
        return CallsAdded(first=1, count=len(calls))

    def call_updates(self, job_id: str, cursor: int, wait: float) -> CallUpdates:
        with self.lock:
            self.asked_after.append(cursor)
            self.lock.notify_all()
            self.lock.wait_for(lambda: bool(self.pending), min(wait, 0.2))  # a quick shutdown
            updates, self.pending = self.pending, []
            self.cursor += len(updates)
            return CallUpdates(cursor=self.cursor, updates=updates)

    def finish_first(self) -> None:
        with self.lock:
            self.pending.append(_ended(0, "slow"))
            self.lock.notify_all()

    def close(self) -> None:
        pass


def test_a_call_that_ends_before_its_index_is_filed_still_resolves() -> None:
    mesh = _QuickMesh()
    executor = MeshExecutor(cast(Client, mesh))
    try:
        slow = executor.submit(str, "slow")
        with mesh.lock:  # the job exists and its follower is waiting for news
            assert mesh.lock.wait_for(lambda: bool(mesh.asked_after), WAIT_S)
        quick = executor.submit(str, "quick")
        assert quick.result(timeout=WAIT_S) == "quick"
        assert not slow.done()  # the other call's future is untouched
        mesh.finish_first()
        assert slow.result(timeout=WAIT_S) == "slow"
        (job,) = executor._engine.jobs.values()
        assert job.early == {}  # nothing kept once its future is filed
    finally:
        executor.shutdown(wait=False, cancel_futures=True)  # no hang when it fails
