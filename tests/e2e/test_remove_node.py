"""Removing a node, with real processes: its agent is cut off within seconds, its task runs on
elsewhere, and its certificate is refused from then on, across a coordinator restart."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import websockets.sync.client
from helpers import kill_leftovers, output_of, wait_for, wait_job
from websockets.exceptions import ConnectionClosed

from planetary_mesh.config import AgentPaths
from planetary_mesh.pki import certs
from planetary_mesh.pki.tls import client_ssl_context
from planetary_mesh.protocol import JobSubmit
from planetary_mesh.testing import LocalMesh

pytestmark = pytest.mark.e2e


def _refusal_of(mesh: LocalMesh, agent: AgentPaths) -> tuple[int, str, int, str]:
    """What the coordinator answers the agent's certificate: to an API call (status, message)
    and to an agent session (close code, reason). Renewing it is refused too."""
    context = client_ssl_context(agent.ca_cert.read_bytes(), agent.cert, agent.key)
    with httpx.Client(base_url=mesh.url, verify=context, timeout=10) as http:
        response = http.get("/v1/nodes")
        csr = certs.make_csr(certs.generate_key(), "agent-1").decode()
        renewal = http.post("/v1/agent/renew", json={"csr": csr})
    assert renewal.status_code == 403 and "revoked" in renewal.json()["error"]
    ws_url = mesh.url.replace("https://", "wss://") + "/v1/agent/session"
    with websockets.sync.client.connect(ws_url, ssl=context, open_timeout=10) as session:
        try:
            session.recv(timeout=10)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "the coordinator did not say why it closed"
            refused = closed.rcvd
        else:
            raise AssertionError("the agent session was not closed")
    return response.status_code, response.json()["error"], refused.code, refused.reason


def test_a_removed_node_is_cut_off_its_task_moves_and_its_certificate_stays_refused(
    tmp_path: Path,
) -> None:
    marker = f"mesh-remove-{uuid.uuid4().hex}"
    # Long enough to outlast `mesh nodes remove` (a Python start) on a loaded 2-core machine.
    code = "import time; time.sleep(6); print('done')"
    try:
        with LocalMesh(tmp_path, agents=2, agent_cpus=1) as mesh, mesh.client() as client:
            job = client.submit(JobSubmit(argv=["python3", "-c", code, marker], count=2))
            wait_for(
                lambda: sum(t.state == "running" for t in client.job(job.id).task_list or []) == 2,
                30,
                "both tasks running",
            )
            victim = next(n.id for n in client.nodes() if n.name == "agent-1")
            index = next(t.index for t in client.job(job.id).task_list or [] if t.node == victim)
            removed = subprocess.run(
                [sys.executable, "-m", "planetary_mesh", "nodes", "remove", "agent-1",
                 "--config", str(mesh.client_config)],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert removed.returncode == 0, removed.stderr
            assert f"node {victim} removed; 1 tasks back in the queue" in removed.stdout
            assert victim not in {n.id for n in client.nodes()}
            # Cut off: the session closes, the agent is refused on reconnecting and stops.
            wait_for(lambda: mesh.agents[0].poll() is not None, 5, "the removed agent to stop")
            assert mesh.agents[0].returncode != 0
            log = (mesh.log_dir / "agent-1.log").read_text()
            assert "revoked" in log and "new token" in log, log[-2000:]
            # Its task runs again elsewhere, without using a retry (the job has none).
            final = wait_job(client, job.id)
            assert final.state == "succeeded", final
            first, second = (final.task_list or [])[index].history or []
            assert first.node == victim and first.state == "lost"
            assert first.reason is not None and "node removed by admin" in first.reason
            assert second.node != victim and second.state == "succeeded"
            assert output_of(client, job.id, index) == "done\n"

            agent = AgentPaths(mesh.agent_dir(0))
            for _ in range(2):  # before and after a coordinator restart
                status, message, close_code, reason = _refusal_of(mesh, agent)
                assert status == 403 and "revoked" in message and "new token" in message
                assert close_code == 4403 and "revoked" in reason
                mesh.kill_coordinator()
                mesh.start_coordinator()
            with mesh.client() as again:
                wait_for(
                    lambda: [(n.name, n.state) for n in again.nodes()] == [("agent-2", "ready")],
                    30,
                    "agent-2 back, and agent-1 still gone",
                )
    finally:
        kill_leftovers(marker)
