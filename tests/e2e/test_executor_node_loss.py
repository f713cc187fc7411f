"""A call whose agent is killed (kill -9) mid-call runs again on another node, and its future
still resolves: node loss is the mesh's business, not the caller's."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import wait_for

from planetary_mesh import MeshExecutor
from planetary_mesh.testing import LocalMesh

pytestmark = pytest.mark.xdist_group("executor-node-loss")


def slow_double(x: int) -> int:
    time.sleep(3)
    return 2 * x


def test_a_call_on_a_killed_agent_runs_again_elsewhere_and_resolves(tmp_path: Path) -> None:
    with (
        LocalMesh(tmp_path, agents=2, agent_cpus=1) as mesh,
        mesh.client() as client,
        MeshExecutor(client, name="node-loss") as executor,
    ):
        future = executor.submit(slow_double, 21)
        wait_for(future.running, 60, "the call to start")
        (job_id,) = executor.job_ids()
        node_id = (client.job(job_id).task_list or [])[0].node
        name = next(n.name for n in client.nodes() if n.id == node_id)
        mesh.kill_agent(int(name.removeprefix("agent-")) - 1)

        assert future.result(timeout=120) == 42
        (task,) = client.job(job_id).task_list or []
        assert task.state == "succeeded" and task.node != node_id
        attempts = client.attempts(job_id, 0)
        assert [a.state for a in attempts] == ["lost", "succeeded"]
        assert attempts[0].node == node_id
