"""A local mesh of three real agents runs real work: arrays, files in and out, cancel, timeout."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import kill_leftovers, output_of, processes_with, wait_for, wait_job

from planetary_mesh.client import Client
from planetary_mesh.errors import RequestRejected
from planetary_mesh.protocol import JobSubmit
from planetary_mesh.testing import LocalMesh

pytestmark = pytest.mark.e2e


def test_a_200_task_array_gives_every_task_its_own_right_output(client: Client) -> None:
    job = client.submit(
        JobSubmit(
            name="squares",
            argv=["sh", "-c", 'echo "$MESH_TASK_INDEX/$MESH_TASK_COUNT $((MESH_TASK_INDEX * 7))"'],
            count=200,
            cpus=0.5,
            memory=16 * 2**20,
        )
    )
    final = wait_job(client, job.id, timeout=120)
    assert final.state == "succeeded", final.tasks
    detail = client.job(job.id)
    assert detail.task_list is not None and len(detail.task_list) == 200
    for task in detail.task_list:
        assert task.state == "succeeded" and task.exit_code == 0 and task.attempts == 1
        assert output_of(client, job.id, task.index) == f"{task.index}/200 {task.index * 7}\n"
    # Placement spreads an array over every node of the mesh.
    assert len({t.node for t in detail.task_list}) == 3


def test_input_files_go_in_and_output_files_come_back(client: Client, tmp_path: Path) -> None:
    job = client.submit(
        JobSubmit(
            argv=[
                "sh",
                "-c",
                "tr a-z A-Z < words.txt > shout.txt; mkdir -p out;"
                ' echo "part $MESH_TASK_INDEX" > out/part.dat; echo not-wanted > skip.log',
            ],
            files={"words.txt": base64.b64encode(b"hello mesh\n").decode()},
            outputs=["shout.txt", "out/*.dat"],
            count=2,
        )
    )
    assert wait_job(client, job.id).state == "succeeded"
    for index in (0, 1):
        assert client.outputs(job.id, index) == {
            "shout.txt": b"HELLO MESH\n",
            "out/part.dat": f"part {index}\n".encode(),
        }
    # The CLI writes them to disk, one folder per task of an array.
    subprocess.run(
        [sys.executable, "-m", "planetary_mesh", "get", job.id, "-d", str(tmp_path)],
        check=True,
        env={**os.environ, "MESH_CONFIG": str(client.config.source)},
        capture_output=True,
    )
    assert (tmp_path / "1" / "out" / "part.dat").read_text() == "part 1\n"
    assert (tmp_path / "0" / "shout.txt").read_text() == "HELLO MESH\n"


def _tree_command(marker: str) -> list[str]:
    """A task whose process tree includes a daemonised grandchild in its own session."""
    sleeper = f"import time; time.sleep(300)  # {marker}"
    return [
        "sh",
        "-c",
        f"setsid python3 -c '{sleeper}' & python3 -c '{sleeper}' & echo started; wait",
    ]


def test_run_submits_and_waits_in_one_call_under_an_id_known_before_the_answer(
    client: Client,
) -> None:
    done = client.run(JobSubmit(argv=["sh", "-c", "echo ran $MESH_JOB_ID"], memory=16 * 2**20))
    assert done.state == "succeeded" and done.tasks["succeeded"] == 1
    assert len(done.id) == 16  # picked by the client, before it sent anything
    assert output_of(client, done.id, 0) == f"ran {done.id}\n"

    # The caller's own id; taken once, it is refused, and the job that holds it is untouched.
    mine = uuid.uuid4().hex
    assert client.run(JobSubmit(id=mine, argv=["true"], memory=16 * 2**20)).id == mine
    before = len(client.jobs(limit=1000))
    with pytest.raises(RequestRejected) as taken:
        client.run(JobSubmit(id=done.id, argv=["sh", "-c", "echo other"]))
    assert taken.value.status == 409
    assert f"a job with id {done.id} exists already" in str(taken.value)
    with pytest.raises(RequestRejected) as taken_too:
        client.submit(JobSubmit(id=mine, argv=["true"]))
    assert taken_too.value.status == 409
    assert len(client.jobs(limit=1000)) == before
    assert output_of(client, done.id, 0) == f"ran {done.id}\n"

    # An id that is not 10-32 lowercase hex digits never reaches the store.
    for wrong in ("../../etc", "ABCDEF0123", "abc"):
        with pytest.raises(RequestRejected) as bad:
            client._request("POST", "/v1/jobs/run", json={"id": wrong, "argv": ["true"]})
        assert bad.value.status == 422, wrong
    assert len(client.jobs(limit=1000)) == before

    # With a timeout, the job as it is then; it goes on, and wait picks it up.
    started = time.monotonic()
    slow = client.run(JobSubmit(argv=["sleep", "30"], memory=16 * 2**20), timeout=0.5)
    assert time.monotonic() - started < 10
    assert slow.tasks["succeeded"] + slow.tasks["failed"] + slow.tasks["cancelled"] == 0
    assert client.cancel(slow.id).state == "cancelled"
    assert client.wait(slow.id, timeout=30).state == "cancelled"


def test_cancel_kills_the_whole_process_tree(client: Client) -> None:
    marker = f"mesh-cancel-{uuid.uuid4().hex}"
    try:
        job = client.submit(JobSubmit(argv=_tree_command(marker)))
        wait_for(lambda: len(processes_with(marker)) >= 2, 30, "the task's processes to start")
        cancelled = client.cancel(job.id)
        assert cancelled.state == "cancelled"
        wait_for(lambda: not processes_with(marker), 10, "every process of the task to die")
        task = client.job(job.id).task_list[0]  # type: ignore[index]
        assert task.state == "cancelled"
        assert task.reason == "cancelled by admin"
    finally:
        kill_leftovers(marker)


def test_timeout_kills_the_whole_process_tree_and_says_why(client: Client) -> None:
    marker = f"mesh-timeout-{uuid.uuid4().hex}"
    try:
        job = client.submit(JobSubmit(argv=_tree_command(marker), timeout=1.5))
        final = wait_job(client, job.id, timeout=30)
        assert final.state == "failed"
        task = client.job(job.id).task_list[0]  # type: ignore[index]
        assert task.reason is not None and "timed out" in task.reason
        assert not processes_with(marker)
        assert output_of(client, job.id, 0) == "started\n"
    finally:
        kill_leftovers(marker)


def test_failed_task_is_retried_and_every_attempt_kept(client: Client) -> None:
    job = client.submit(JobSubmit(argv=["sh", "-c", "echo try $MESH_ATTEMPT; exit 4"], retries=2))
    final = wait_job(client, job.id)
    assert final.state == "failed"
    attempts = client.attempts(job.id, 0)
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert all(a.state == "failed" and a.exit_code == 4 for a in attempts)
    assert output_of(client, job.id, 0) == "try 3\n"


def _mesh(mesh: LocalMesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "planetary_mesh", *args, "--config", str(mesh.client_config)]
        if args[0] not in ("run", "submit")
        else [
            sys.executable,
            "-m",
            "planetary_mesh",
            args[0],
            "--config",
            str(mesh.client_config),
            *args[1:],
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_mesh_run_streams_output_and_exits_with_the_task_exit_code(mesh: LocalMesh) -> None:
    done = _mesh(mesh, "run", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert done.returncode == 7
    assert "out" in done.stdout and "err" in done.stdout
    assert "exit code 7" in done.stderr


def test_mesh_run_array_exits_zero_only_if_every_task_succeeded(mesh: LocalMesh) -> None:
    ok = _mesh(mesh, "run", "--array", "4", "--", "sh", "-c", "echo i=$MESH_TASK_INDEX")
    assert ok.returncode == 0
    assert sorted(line for line in ok.stdout.splitlines()) == [f"[{i}] i={i}" for i in range(4)]
    bad = _mesh(mesh, "run", "--array", "3", "--", "sh", "-c", 'test "$MESH_TASK_INDEX" != 1')
    assert bad.returncode == 1
    assert "task 1 failed: exit code 1" in bad.stderr


def test_listings_have_json_with_the_documented_fields(mesh: LocalMesh) -> None:
    import json

    job_id = _mesh(mesh, "submit", "--array", "2", "--", "true").stdout.strip()
    nodes = json.loads(_mesh(mesh, "nodes", "-o", "json").stdout)
    assert len(nodes) == 3
    for node in nodes:
        assert {"id", "name", "state", "cpus", "memory"} <= node.keys()
        assert node["state"] == "ready" and node["cpus"] == 2
    jobs = json.loads(_mesh(mesh, "jobs", "-o", "json").stdout)
    assert any(j["id"] == job_id for j in jobs)
    assert {"id", "name", "state", "tasks"} <= jobs[0].keys()
    with mesh.client() as client:
        wait_job(client, job_id)
    status = json.loads(_mesh(mesh, "status", job_id, "-o", "json").stdout)
    assert status["state"] == "succeeded"
    for task in status["task_list"]:
        assert {"index", "state", "node", "exit_code", "reason", "attempts"} <= task.keys()
        assert task["state"] == "succeeded" and task["exit_code"] == 0


def test_logs_follow_prints_output_as_it_comes_across_a_retry(mesh: LocalMesh) -> None:
    job_id = _mesh(
        mesh,
        "submit",
        "--retries",
        "1",
        "--",
        "sh",
        "-c",
        'echo "try $MESH_ATTEMPT"; sleep 2; echo "end $MESH_ATTEMPT"; test "$MESH_ATTEMPT" = 2',
    ).stdout.strip()
    with mesh.client() as client:
        wait_for(lambda: output_of(client, job_id, 0) == "try 1\n", 30, "the first attempt")
    followed = _mesh(mesh, "logs", job_id, "-f")
    assert followed.returncode == 0
    assert followed.stdout == "try 1\nend 1\ntry 2\nend 2\n"
    # Without -f: the current attempt's output, at once.
    assert _mesh(mesh, "logs", job_id).stdout == "try 2\nend 2\n"
