"""kill -9 the coordinator mid-job, start it again: nothing committed is lost, the job finishes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from helpers import output_of, wait_for, wait_job

from planetary_mesh.errors import CoordinatorUnreachable
from planetary_mesh.protocol import JobSubmit
from planetary_mesh.testing import LocalMesh

pytestmark = pytest.mark.e2e

TASKS = 24


def test_coordinator_kill9_and_restart_loses_nothing(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, agents=3, agent_cpus=1) as mesh:
        with mesh.client() as client:
            node_ids = {n.id for n in client.nodes()}
            job = client.submit(
                JobSubmit(
                    argv=[
                        "sh",
                        "-c",
                        'sleep 0.4; echo "line $MESH_TASK_INDEX"; echo $MESH_TASK_INDEX > r.txt',
                    ],
                    outputs=["r.txt"],
                    count=TASKS,
                    cpus=1,
                )
            )
            wait_for(
                lambda: client.job(job.id).tasks["succeeded"] >= 4,
                60,
                "some tasks to finish before the crash",
            )
            before = client.job(job.id)
            done_before = [t.index for t in before.task_list or [] if t.state == "succeeded"]

            # A submit-and-wait in flight when the coordinator dies: the caller learns the id
            # of the job it may have made (it had picked it before sending).
            lost: list[BaseException] = []
            late = JobSubmit(argv=["sh", "-c", "sleep 3; echo late"], priority=10)

            def run_late() -> None:
                with mesh.client() as own:
                    try:
                        own.run(late)
                    except BaseException as exc:  # the assertion below says what it was
                        lost.append(exc)

            runner = threading.Thread(target=run_late)
            runner.start()
            wait_for(lambda: len(client.jobs()) == 2, 30, "the run's job to be submitted")

        mesh.kill_coordinator()
        runner.join(30)
        assert not runner.is_alive()
        [error] = lost
        assert isinstance(error, CoordinatorUnreachable), repr(error)
        assert error.job_id is not None and error.job_id in str(error)
        mesh.start_coordinator()

        with mesh.client() as client:
            # Agents reconnect by themselves, under the node ids they had.
            wait_for(
                lambda: {n.id for n in client.nodes() if n.state == "ready"} == node_ids,
                30,
                "the agents to reconnect",
            )
            final = wait_job(client, job.id, timeout=120)
            assert final.state == "succeeded", final.tasks
            detail = client.job(job.id)
            assert detail.task_list is not None
            for task in detail.task_list:
                assert task.state == "succeeded"
                assert output_of(client, job.id, task.index) == f"line {task.index}\n"
                assert client.outputs(job.id, task.index) == {"r.txt": f"{task.index}\n".encode()}
            # What had finished before the crash was neither lost nor run again.
            for index in done_before:
                assert detail.task_list[index].attempts == 1
            # The run's job was not lost either: waited on by the id the error gave.
            assert client.wait(error.job_id, timeout=60).state == "succeeded"
            assert output_of(client, error.job_id, 0) == "late\n"
