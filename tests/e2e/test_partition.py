"""A partition longer than the grace, across real hosts in network namespaces.

A coordinator and three agents, each in its own namespace on a private bridge. One agent is cut
off by an nft drop while it runs a task, stays cut off until the coordinator declares it lost and
its work has finished elsewhere, then is healed. The job still succeeds with every task's result
recorded once: the cut-off agent's late result is refused, it rejoins by itself, and nothing of
its stale attempt is left running.

The test runs in the root namespace, which cannot reach the bridge: it talks to the coordinator
through the `mesh` CLI run inside the coordinator's namespace.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.netns import CLI_TIMEOUT, PARTITION_RULES, NamespacedMesh, Network, build_network
from helpers import kill_leftovers, processes_with, wait_for
from pydantic import TypeAdapter

from planetary_mesh.config import CoordinatorPaths
from planetary_mesh.coordinator.bootstrap import init_mesh

pytestmark = pytest.mark.e2e

AGENTS = ("a1", "a2", "a3")
TASKS = 12
PORT = 7443
# A node silent this long is lost (with 1 s beats the grace works out at 4 s): it keeps the test
# short, and the partition still has to outlast it.
LOST_AFTER = "3s"

# Run inside the coordinator's namespace: poll the job until a task has just started on the node,
# then cut the node off at once (the partition command comes as JSON, its rules on stdin) and
# print the indexes of the tasks it runs. Polling in-process, with a task that started under
# FRESH seconds ago, makes sure the cut lands while the task still runs.
PARTITION_ON_CUE = """
import json, subprocess, sys, time
from pathlib import Path
from planetary_mesh.client import Client

config, job_id, node_id, fresh, timeout, partition = sys.argv[1:]
rules = sys.stdin.read()
deadline = time.monotonic() + float(timeout)
with Client.from_config(Path(config)) as client:
    while True:
        tasks = client.job(job_id).task_list or []
        now = time.time()
        running = [
            t.index
            for t in tasks
            if t.node == node_id and t.state == "running"
            and t.started_at is not None and now - t.started_at < float(fresh)
        ]
        if running:
            break
        if time.monotonic() > deadline:
            sys.exit(f"no task of job {job_id} started on node {node_id} within {timeout} s")
        time.sleep(0.02)
subprocess.run(json.loads(partition), input=rules, text=True, check=True)
print(json.dumps(running))
"""


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    yield from build_network(["c", *AGENTS], tmp_path / "logs")


def test_partitioned_agent_past_the_grace_loses_nothing_and_duplicates_nothing(
    network: Network, tmp_path: Path
) -> None:
    coordinator_ip = network.hosts["c"].ip
    url = f"https://{coordinator_ip}:{PORT}"
    data_dir = tmp_path / "coordinator"
    paths = CoordinatorPaths(data_dir)
    init_mesh(paths, data_dir / "client.toml", [coordinator_ip])
    mesh = NamespacedMesh(network, data_dir)

    python = [sys.executable, "-m", "planetary_mesh"]
    network.spawn(
        "c",
        "coordinator",
        [
            *python,
            "coordinator",
            "--data-dir",
            str(data_dir),
            "--listen",
            f"{coordinator_ip}:{PORT}",
            "--lost-after",
            LOST_AFTER,
        ],
    )

    def listening() -> bool:
        network.check_running()
        return paths.url_file.exists()

    wait_for(listening, 30, "the coordinator to listen")
    assert paths.url_file.read_text().strip() == url

    token = mesh.cli("token", "create", "--uses", str(len(AGENTS)), "--config", mesh.config)
    for name in AGENTS:
        network.spawn(
            name,
            name,
            [
                *python,
                "agent",
                "--coordinator",
                url,
                "--token",
                token.strip(),
                "--data-dir",
                str(tmp_path / "agents" / name),
                "--cpus",
                "1",
                "--name",
                name,
            ],
        )
    wait_for(
        lambda: (
            sorted(n for n, info in mesh.nodes().items() if info.state == "ready") == list(AGENTS)
        ),
        30,
        "three agents to join over the bridge",
    )
    ids = {name: info.id for name, info in mesh.nodes().items()}
    cut = ids["a1"]

    # A marker in every task's argv finds any of their processes, wherever they run.
    marker = f"marker-{uuid.uuid4().hex}"
    try:
        job_id = mesh.cli(
            "submit",
            "--array",
            str(TASKS),
            "--cpus",
            "1",
            "--config",
            mesh.config,
            "--",
            "sh",
            "-c",
            'sleep 1; echo "result $MESH_TASK_INDEX"',
            marker,
        ).strip()

        # Cut a1 off while it runs a task (tasks take 1 s; one that started under 0.5 s ago).
        cue = [mesh.config, job_id, cut, "0.5", "30", json.dumps(network.partition_command("a1"))]
        cutter = subprocess.run(
            network.hosts["c"].command([sys.executable, "-c", PARTITION_ON_CUE, *cue]),
            input=PARTITION_RULES,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT + 10,
            check=False,
        )
        assert cutter.returncode == 0, cutter.stderr
        on_cut = TypeAdapter(list[int]).validate_json(cutter.stdout)

        # The partition outlasts the grace: a1 is declared lost, and what it ran is done again
        # elsewhere while it is still cut off (so its own result can only arrive late).
        wait_for(lambda: mesh.nodes()["a1"].state == "lost", 30, "the coordinator to lose a1")

        def redone_elsewhere() -> bool:
            tasks = mesh.job(job_id).task_list or []
            return all(tasks[i].state == "succeeded" and tasks[i].node != cut for i in on_cut)

        wait_for(redone_elsewhere, 30, f"tasks {on_cut} to succeed on another node")
        assert mesh.nodes()["a1"].state == "lost"
        network.heal("a1")

        wait_for(
            lambda: mesh.job(job_id).state in ("succeeded", "failed", "cancelled"),
            60,
            "the job to end",
        )
        # a1 comes back by itself, with the certificate it stored when it joined.
        wait_for(lambda: mesh.nodes()["a1"].state == "ready", 30, "a1 to rejoin after healing")
        assert mesh.nodes()["a1"].id == cut

        # Its result for the superseded attempt arrives once it is back, and is refused.
        def refused_late() -> bool:
            tasks = mesh.job(job_id).task_list or []
            return all(
                any(a.node == cut and a.late_result for a in tasks[i].history or []) for i in on_cut
            )

        wait_for(refused_late, 30, f"a1's late results for tasks {on_cut} to be refused")

        job = mesh.job(job_id)
        assert job.state == "succeeded", job.tasks
        assert job.task_list is not None and len(job.task_list) == TASKS
        for task in job.task_list:
            history = task.history or []
            assert task.state == "succeeded", (task.index, task.reason)
            assert task.attempts == len(history), (task.index, history)
            succeeded = [a for a in history if a.state == "succeeded"]
            assert len(succeeded) == 1, (task.index, history)
            assert succeeded[0].attempt == max(a.attempt for a in history), history
            # Only a1 was ever lost; no other attempt ended any other way.
            for attempt in history:
                assert attempt.state in ("succeeded", "lost"), (task.index, attempt)
                if attempt.state == "lost":
                    assert attempt.node == cut, (task.index, attempt)
        for index in on_cut:
            history = job.task_list[index].history or []
            lost = [a for a in history if a.node == cut and a.state == "lost"]
            assert lost, (index, history)
            assert lost[0].reason and "lost" in lost[0].reason, lost[0]
            assert lost[0].late_result and "refused" in lost[0].late_result, lost[0]
            (won,) = [a for a in history if a.state == "succeeded"]
            assert won.node != cut and won.attempt > lost[0].attempt, history

        # Each task's output is there exactly once: the accepted attempt's.
        outputs = mesh.cli_many(
            [["logs", job_id, "--task", str(i), "--config", mesh.config] for i in range(TASKS)]
        )
        for index, output in enumerate(outputs):
            assert output == f"result {index}\n", (index, output)

        # Nothing of the stale attempt (or any other) outlives the job.
        assert processes_with(marker) == []
        network.check_running()
    finally:
        kill_leftovers(marker)
