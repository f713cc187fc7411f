"""Bounded chaos: a 2,000-task job while agents are killed and restarted and the coordinator is
restarted once. Disruptions are keyed to progress (every so many finished tasks), not to sleeps,
so the test stops by itself: when the job ends or at its deadline."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from helpers import output_of, wait_job, wait_succeeded

from planetary_mesh.protocol import JobSubmit
from planetary_mesh.testing import LocalMesh

pytestmark = pytest.mark.e2e

TASKS = 2000
DEADLINE = 240.0


def test_chaos_every_task_succeeds_exactly_once(tmp_path: Path) -> None:
    rng = random.Random(20261127)
    with LocalMesh(tmp_path, agents=3, agent_cpus=2) as mesh:
        with mesh.client() as client:
            job = client.submit(
                JobSubmit(
                    argv=["sh", "-c", 'echo "task $MESH_TASK_INDEX"'],
                    count=TASKS,
                    memory=16 * 2**20,
                )
            )
        # (finished tasks, action): agents die and come back; the coordinator restarts once.
        plan = [
            (150, "kill"), (300, "restart"), (450, "kill"), (550, "kill"),
            (700, "restart"), (800, "restart"), (900, "coordinator"), (1100, "kill"),
            (1300, "restart"), (1500, "kill"), (1650, "restart"),
        ]  # fmt: skip
        down: list[int] = []
        for threshold, action in plan:
            with mesh.client() as client:
                wait_succeeded(client, job.id, threshold, DEADLINE)
            if action == "kill":
                up = [i for i in range(3) if i not in down]
                victim = rng.choice(up)
                mesh.kill_agent(victim)
                down.append(victim)
            elif action == "restart" and down:
                mesh.restart_agent(down.pop(0))
            elif action == "coordinator":
                mesh.kill_coordinator()
                mesh.start_coordinator()
        with mesh.client() as client:
            final = wait_job(client, job.id, DEADLINE)
            assert final.state == "succeeded", final.tasks
            assert final.tasks["succeeded"] == TASKS
            for task in final.task_list or []:
                succeeded = [a for a in task.history or [] if a.state == "succeeded"]
                assert len(succeeded) == 1, task
                assert task.attempts == len(task.history or [])
            # Spot-check outputs: each task's output was recorded once, unmixed.
            for index in rng.sample(range(TASKS), 50):
                assert output_of(client, job.id, index) == f"task {index}\n"
