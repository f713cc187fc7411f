"""MeshExecutor against a real local mesh: the stdlib Executor and Future contract, pickled
closures and local modules, remote exceptions with their tracebacks, and the specific errors of
calls killed for memory, time, a cancel, a crash or a refusal.

Two agents of one CPU each, sandboxed (bwrap, as the task user): the functions of this file and
the helper module written below are in folders the task user cannot read, so they reach the
workers only by value, as a user's script and its helpers would.
"""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, as_completed, wait
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_for

from planetary_mesh import MeshExecutor
from planetary_mesh.client import Client, pickling
from planetary_mesh.errors import (
    CallCancelled,
    CallOutOfMemory,
    CallRefused,
    CallTimedOut,
    ResultTooLarge,
    WorkerDied,
)
from planetary_mesh.protocol import MAX_RESULT_BYTES
from planetary_mesh.testing import LocalMesh

pytestmark = pytest.mark.xdist_group("executor")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    with LocalMesh(tmp_path_factory.mktemp("mesh"), agents=2, agent_cpus=1) as local:
        yield local


@pytest.fixture
def client(mesh: LocalMesh) -> Iterator[Client]:
    with mesh.client() as c:
        yield c


@pytest.fixture
def executor(client: Client, request: pytest.FixtureRequest) -> Iterator[MeshExecutor]:
    # A job of its own per test: no test's calls queue behind another's.
    with MeshExecutor(client, name=request.node.name[:100]) as ex:
        yield ex


def square(x: int) -> int:
    return x * x


def slow(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def test_map_keeps_order_and_futures_work_with_stdlib_wait_and_as_completed(
    executor: MeshExecutor,
) -> None:
    assert list(executor.map(square, range(40))) == [x * x for x in range(40)]
    assert list(executor.map(pow, range(30), [2] * 30, chunksize=7)) == [x**2 for x in range(30)]

    called: list[Future[int]] = []
    futures = [executor.submit(square, x) for x in range(10)]
    for future in futures:
        future.add_done_callback(called.append)
    done, not_done = wait(futures, timeout=60)
    assert len(done) == 10 and not not_done
    assert sorted(f.result() for f in as_completed(futures, timeout=60)) == [
        x * x for x in range(10)
    ]
    wait_for(lambda: len(called) == 10, 10, "every done callback to be called")
    assert set(called) == set(futures)
    # A callback added to a done future runs at once, as the stdlib says.
    late: list[Future[int]] = []
    futures[0].add_done_callback(late.append)
    assert late == [futures[0]]


def test_result_timeout_and_cancel_only_before_the_call_starts(
    executor: MeshExecutor, client: Client
) -> None:
    # Both CPUs busy, so a third call must wait in the queue.
    busy = [executor.submit(slow, 3.0, n) for n in range(2)]
    wait_for(lambda: all(f.running() for f in busy), 60, "both calls to start")
    queued = executor.submit(square, 5)
    with pytest.raises(TimeoutError):
        busy[0].result(timeout=0.1)
    assert busy[0].cancel() is False  # running: the stdlib says no
    assert queued.cancel() is True
    assert queued.cancelled() and queued.done()
    done, _ = wait([queued], timeout=1)  # the stdlib's wait counts it as done at once
    assert done == {queued}
    assert [f.result(timeout=60) for f in busy] == [0, 1]

    (job_id,) = executor.job_ids()

    def cancelled_tasks() -> list[int]:
        tasks = client.job(job_id).task_list or []
        return [t.attempts for t in tasks if t.state == "cancelled"]

    wait_for(lambda: cancelled_tasks() == [0], 30, "the cancelled call to end on the mesh")


def test_cancel_running_kills_the_call_and_says_so(executor: MeshExecutor) -> None:
    future = executor.submit(slow, 60.0)
    wait_for(future.running, 60, "the call to start")
    assert executor.cancel_running(future) is True
    with pytest.raises(CallCancelled, match="cancelled"):
        future.result(timeout=30)
    assert executor.cancel_running(future) is False  # ended: nothing to cancel
    assert executor.submit(square, 3).result(timeout=60) == 9  # its worker was replaced


def test_shutdown_with_cancel_futures_runs_what_started_and_drops_the_rest(
    client: Client,
) -> None:
    executor = MeshExecutor(client, name="shutdown-cancel")
    # Long enough that, on a loaded machine too, nothing queued starts before the shutdown.
    busy = [executor.submit(slow, 6.0, n) for n in range(2)]
    wait_for(lambda: all(f.running() for f in busy), 60, "both calls to start")
    waiting = [executor.submit(square, n) for n in range(5)]
    (job_id,) = executor.job_ids()
    # Queued on the mesh (both CPUs are busy), not just in this process.
    wait_for(lambda: client.job(job_id, tasks=False).tasks["total"] == 7, 30, "the calls sent")
    executor.shutdown(wait=True, cancel_futures=True)
    assert [f.result() for f in busy] == [0, 1]
    # Those the mesh had taken but this process had not yet filed under their task indices
    # were once missed here: they ran after the shutdown.
    assert all(f.cancelled() for f in waiting), client.job(job_id).task_list
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(square, 1)
    job = client.wait(job_id, timeout=30)
    assert (job.tasks["succeeded"], job.tasks["cancelled"]) == (2, 5)


def test_closures_lambdas_and_a_module_that_is_only_on_the_callers_machine(
    executor: MeshExecutor, tmp_path: Path
) -> None:
    base = 10
    assert executor.submit(lambda x: x + base, 5).result(timeout=60) == 15

    def make_adder(n: int) -> Any:
        def add(x: int) -> int:
            return x + n

        return add

    assert executor.submit(make_adder(3), 4).result(timeout=60) == 7

    (tmp_path / "mesh_local_helper.py").write_text(
        textwrap.dedent(
            """
            FACTOR = 3

            class Point:
                def __init__(self, x):
                    self.x = x

            def scaled(x):
                return _inner(Point(x)).x

            def _inner(point):
                return Point(point.x * FACTOR)
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import mesh_local_helper  # type: ignore[import-not-found]

        assert executor.submit(mesh_local_helper.scaled, 7).result(timeout=60) == 21
        assert list(executor.map(mesh_local_helper.scaled, [1, 2])) == [3, 6]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mesh_local_helper", None)


def inner_division(x: int) -> float:
    return x / 0


def failing_outer(x: int) -> float:
    return inner_division(x) + 1


def test_a_remote_exception_is_raised_with_its_type_and_remote_traceback(
    executor: MeshExecutor, client: Client
) -> None:
    future = executor.submit(failing_outer, 1)
    with pytest.raises(ZeroDivisionError) as caught:
        future.result(timeout=60)
    text = "".join(traceback.format_exception(caught.value))
    # The frames of the call on the agent, in order, then the note naming the call.
    assert text.index("in failing_outer") < text.index("in inner_division")
    assert "return x / 0" in text or "line" in text
    assert "raised on the mesh by call 0 of job" in text
    assert isinstance(future.exception(), ZeroDivisionError)
    # The mesh records it as a failed task, and says why in words.
    (job_id,) = executor.job_ids()
    why = client.why(job_id, 0)
    assert why.state == "failed"
    assert "raised builtins.ZeroDivisionError: division by zero" in why.summary


def noisy(x: int) -> int:
    print(f"working on {x}")
    print("a warning", file=sys.stderr)
    return x


def test_what_a_call_prints_is_its_task_log(executor: MeshExecutor, client: Client) -> None:
    assert executor.submit(noisy, 42).result(timeout=60) == 42
    (job_id,) = executor.job_ids()
    import base64

    log = base64.b64decode(client.logs(job_id, 0).data).decode()
    assert "working on 42" in log and "a warning" in log


def die() -> None:
    os._exit(3)


def test_workers_are_reused_and_replaced_after_a_crash(
    executor: MeshExecutor, client: Client
) -> None:
    workers = [executor.submit(worker_token).result(timeout=60) for _ in range(8)]
    (job_id,) = executor.job_ids()
    tasks = client.job(job_id).task_list or []
    by_node: dict[str | None, set[str]] = {}
    for task, worker in zip(tasks, workers, strict=True):
        by_node.setdefault(task.node, set()).add(worker)
    # One warm worker per node served every call there: no interpreter per call.
    assert all(len(tokens) == 1 for tokens in by_node.values()), by_node

    with pytest.raises(WorkerDied, match="exit code 3"):
        executor.submit(die).result(timeout=60)
    assert executor.submit(square, 6).result(timeout=60) == 36


def hog(megabytes: int) -> int:
    block = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return len(block)


def test_a_call_over_its_memory_limit_raises_the_oom_error(executor: MeshExecutor) -> None:
    small = executor.options(memory="64M")
    with pytest.raises(CallOutOfMemory, match="out of memory") as caught:
        small.submit(hog, 400).result(timeout=120)
    assert "options(memory=" in str(caught.value)
    assert small.submit(hog, 8).result(timeout=60) == 8 * 1024 * 1024


def test_a_call_past_its_timeout_raises_the_timeout_error(executor: MeshExecutor) -> None:
    future = executor.submit(slow, 60.0, mesh_options={"timeout": 1.0})
    with pytest.raises(CallTimedOut, match="timed out after 1s"):
        future.result(timeout=60)


def big(size: int) -> bytes:
    return b"x" * size


def test_results_and_arguments_over_the_limit_fail_clearly(executor: MeshExecutor) -> None:
    with pytest.raises(ResultTooLarge, match=r"over the 8\.0M a call may return"):
        executor.submit(big, MAX_RESULT_BYTES + 1).result(timeout=60)
    assert len(executor.submit(big, 2 * 1024 * 1024).result(timeout=60)) == 2 * 1024 * 1024
    with pytest.raises(ResultTooLarge, match="a call may carry"):
        executor.submit(len, b"y" * (MAX_RESULT_BYTES + 1))


def test_an_agent_refuses_calls_pickled_by_another_python(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pickling, "PYTHON", "3.9")
    own = f"{sys.version_info.major}.{sys.version_info.minor}"
    with MeshExecutor(client, name="other-python") as executor:
        future = executor.submit(square, 2)
        with pytest.raises(CallRefused) as caught:
            future.result(timeout=60)
    message = str(caught.value)
    assert "pickled by Python 3.9" in message and f"runs Python {own}" in message


def test_many_calls_from_threads_at_once(executor: MeshExecutor) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def submit_some(offset: int) -> None:
        futures = [executor.submit(square, offset + i) for i in range(25)]
        values = [f.result(timeout=120) for f in futures]
        with lock:
            results.extend(values)

    threads = [threading.Thread(target=submit_some, args=(n * 100,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == sorted((n * 100 + i) ** 2 for n in range(4) for i in range(25))


def test_first_completed_wait_returns_the_quick_call(executor: MeshExecutor) -> None:
    slow_one = executor.submit(slow, 5.0)
    quick = executor.submit(square, 2)
    done, _ = wait([slow_one, quick], timeout=60, return_when=FIRST_COMPLETED)
    assert quick in done
    assert slow_one.result(timeout=60) is None


def worker_token() -> str:
    """A name for the worker process that runs this call: made once per process."""
    import builtins
    import uuid

    if not hasattr(builtins, "_mesh_test_worker"):
        builtins._mesh_test_worker = uuid.uuid4().hex  # type: ignore[attr-defined]
    return str(builtins._mesh_test_worker)  # type: ignore[attr-defined]


_KEPT: list[bytearray] = []


def keep_memory(megabytes: int) -> str:
    """Hold ``megabytes`` in the worker after returning (a cache that grew too big)."""
    block = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    _KEPT.append(block)
    return worker_token()


def test_a_worker_past_its_memory_high_water_mark_is_replaced(executor: MeshExecutor) -> None:
    # 256 MiB per call: a worker that holds more than 80 % of that after a call is retired.
    calls = executor.options(memory="256M", name="high-water")
    heavy = calls.submit(keep_memory, 230).result(timeout=60)
    after = {calls.submit(worker_token).result(timeout=60) for _ in range(6)}
    assert heavy not in after  # that worker exited after answering; fresh ones took over


def test_map_timeout_counts_from_the_call_and_cancels_the_rest(executor: MeshExecutor) -> None:
    # The first call has 4 s even on a loaded machine (a worker to start); the second needs 6.
    results = executor.map(slow, [0.0, 6.0, 6.0, 6.0], timeout=4.0)
    assert next(results) is None
    with pytest.raises(TimeoutError):
        next(results)


def always_fails() -> None:
    raise ValueError("not this time")


def test_retries_run_a_failing_call_again_before_it_fails(
    executor: MeshExecutor, client: Client
) -> None:
    future = executor.options(retries=2, name="retried").submit(always_fails)
    with pytest.raises(ValueError, match="not this time"):
        future.result(timeout=120)
    job_id = next(j for j in executor.job_ids() if client.job(j, tasks=False).name == "retried")
    attempts = client.attempts(job_id, 0)
    assert [a.state for a in attempts] == ["failed", "failed", "failed"]
