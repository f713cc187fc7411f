"""`mesh why` on a real local mesh: a task no node can hold names every node and its reason; an
ended task says how it ended, with its last lines; a cancelled one says by whom."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_for, wait_job

from planetary_mesh.protocol import JobSubmit
from planetary_mesh.testing import LocalMesh

pytestmark = pytest.mark.e2e


def _why(mesh: LocalMesh, job_id: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "planetary_mesh", "why", job_id, *args,
         "--config", str(mesh.client_config)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_why_names_each_node_for_a_pending_task_and_the_end_of_an_ended_one(
    tmp_path: Path,
) -> None:
    with (
        LocalMesh(tmp_path, agents=2, agent_cpus=1, agent_memory="2G") as mesh,
        mesh.client() as client,
    ):
        too_big = client.submit(JobSubmit(argv=["true"], memory=64 * 1024**3))
        busy = client.submit(JobSubmit(argv=["sleep", "60"], count=2))
        wait_for(lambda: client.job(busy.id, tasks=False).tasks.get("running", 0) == 2, 20, "busy")
        client.drain(client.nodes()[0].id, None)
        waiting = client.submit(JobSubmit(argv=["true"]))

        shown = _why(mesh, too_big.id)
        assert shown.returncode == 0, shown.stderr
        assert "no node can ever run it" in shown.stdout
        for node in client.nodes():
            assert node.id in shown.stdout and node.name in shown.stdout
        info = json.loads(_why(mesh, too_big.id, "-o", "json").stdout)
        reasons = {n["name"]: n["reason"] for n in info["nodes"]}
        assert len(reasons) == 2
        drained_name = client.nodes()[0].name
        for name, reason in reasons.items():  # the drained one says so first
            expected = "draining" if name == drained_name else "too small: the job asks 64.0G"
            assert reason.startswith(expected), reasons

        info = json.loads(_why(mesh, waiting.id, "-o", "json").stdout)
        reasons = {n["name"]: n["reason"] for n in info["nodes"]}
        assert info["state"] == "pending" and not any(n["fits_now"] for n in info["nodes"])
        drained = client.nodes()[0].name
        assert reasons[drained].startswith("draining")
        other = next(name for name in reasons if name != drained)
        assert reasons[other].startswith("not enough free CPUs: needs 1, 0 free of 1")

        client.cancel(busy.id)
        failing = client.submit(JobSubmit(argv=["sh", "-c", "echo one; echo two; exit 3"]))
        client.undrain(client.nodes()[0].id)
        assert wait_job(client, failing.id).state == "failed"
        ended = _why(mesh, failing.id)
        assert "failed on its only attempt: exit code 3" in ended.stdout, ended.stdout
        assert "| one" in ended.stdout and "| two" in ended.stdout
        cancelled = _why(mesh, busy.id, "--task", "1")
        assert "cancelled by admin" in cancelled.stdout, cancelled.stdout
        missing = _why(mesh, busy.id, "--task", "7")
        assert missing.returncode != 0 and "has no task 7" in missing.stderr
