"""A task's output is bounded: past the agent's --task-log the rest is dropped, the cut is
marked where it happens, and the task itself is not harmed."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import output_of, wait_job

from planetary_mesh.protocol import JobSubmit
from planetary_mesh.testing import LocalMesh

pytestmark = pytest.mark.e2e


def test_output_past_the_log_limit_is_cut_and_the_cut_is_marked(tmp_path: Path) -> None:
    limit = 64 * 1024
    loud = (
        "import sys\n"
        "for i in range(20000):\n"
        "    sys.stdout.write(f'line {i:05d} ' + 'x' * 50 + '\\n')\n"
        "print('the end')"
    )
    with (
        LocalMesh(tmp_path, agents=1, agent_cpus=1, agent_args=("--task-log", "64K")) as mesh,
        mesh.client() as client,
    ):
        job = client.submit(JobSubmit(argv=["python3", "-c", loud]))
        final = wait_job(client, job.id)
        assert final.state == "succeeded"  # the task ran to its end
        out = output_of(client, job.id, 0)
        data = out.encode()
        marker = b"\n[planetary-mesh: output truncated at 64.0K; the rest was dropped]\n"
        assert data[limit:] == marker  # exactly the limit kept, then where it was cut
        assert data.startswith(b"line 00000 ") and b"line 01000 " in data[:limit]
        assert "the end" not in out and "line 19999" not in out
