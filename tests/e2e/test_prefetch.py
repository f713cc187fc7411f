"""A job of tiny tasks on a real one-CPU agent: the coordinator hands the node more than it can
run at once (prefetch), and the agent still runs one at a time, in order; cancelling the job
drops what waited on the node."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from helpers import output_of, wait_for, wait_job

from planetary_mesh.protocol import JobSubmit
from planetary_mesh.testing import LocalMesh

pytestmark = pytest.mark.e2e

# Each task prints when it started and when it ended (ns since the epoch, the host's clock).
STAMPS = ["sh", "-c", "s=$(date +%s%N); e=$(date +%s%N); echo $s $e"]


def test_prefetched_tasks_wait_their_turn_and_cancelled_ones_never_run(tmp_path: Path) -> None:
    with (
        LocalMesh(tmp_path, agents=1, agent_cpus=1, agent_memory="1G") as mesh,
        mesh.client() as client,
    ):
        job = client.submit(JobSubmit(argv=STAMPS, count=300, cpus=1, memory=16 * 2**20))
        # Once its first tasks proved short, the node holds more of them than its one CPU.
        held: list[int] = []

        def node_holds_more_than_it_runs() -> bool:
            (node,) = client.nodes()
            held.append(node.running)
            assert node.used_cpus <= node.cpus  # shown full at most, never over-full
            return node.running > 1 or client.job(job.id, tasks=False).state == "succeeded"

        wait_for(node_holds_more_than_it_runs, 60, "the node to hold prefetched tasks")
        assert max(held) > 1, f"the node never held more than one task: {held}"
        final = wait_job(client, job.id, timeout=120)
        assert final.state == "succeeded", final.tasks
        # The agent ran them one at a time: no two tasks' lifetimes overlap.
        spans = sorted(tuple(map(int, output_of(client, job.id, i).split())) for i in range(300))
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, "two tasks ran at once on a one-CPU node"

        # Cancelled amid a run of prefetched tasks: the job ends, nothing stays held on the
        # node (queued ones are dropped; tests/unit/test_admission.py shows they never start).
        slow = ["sh", "-c", "echo ran; sleep 0.05"]
        job = client.submit(JobSubmit(argv=slow, count=2000, cpus=1, memory=16 * 2**20))
        wait_for(lambda: client.nodes()[0].running > 1, 60, "prefetched tasks on the node")
        client.cancel(job.id)
        final = wait_job(client, job.id, timeout=60)
        assert final.state == "cancelled"
        wait_for(lambda: client.nodes()[0].running == 0, 30, "the node to hold nothing")
        # The agent goes on working.
        after = client.submit(JobSubmit(argv=["true"], count=3, memory=16 * 2**20))
        assert wait_job(client, after.id).state == "succeeded"
