"""/metrics on a real local mesh: Prometheus text that prometheus_client's own parser reads, with
figures that match what the API says, and nothing for a caller without a credential."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from helpers import wait_for, wait_job
from prometheus_client.parser import text_string_to_metric_families

from planetary_mesh.config import load_client_config
from planetary_mesh.pki.tls import client_ssl_context
from planetary_mesh.protocol import JobSubmit
from planetary_mesh.testing import LocalMesh

pytestmark = pytest.mark.e2e


def _scrape(mesh: LocalMesh) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample, by name and labels."""
    config = load_client_config(mesh.client_config)
    context = client_ssl_context(config.ca.read_bytes(), config.cert, config.key)
    with httpx.Client(base_url=mesh.url, verify=context, timeout=10) as http:
        response = http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def test_metrics_parse_and_match_the_api(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, agents=2, agent_cpus=1) as mesh, mesh.client() as client:
        done = client.submit(JobSubmit(argv=["sleep", "0.5"], count=5))
        assert wait_job(client, done.id).state == "succeeded"
        stuck = client.submit(JobSubmit(argv=["true"], memory=1024**5))  # fits no node
        wait_for(lambda: client.job(stuck.id, tasks=False).state == "pending", 10, "queued")

        samples = _scrape(mesh)
        nodes = client.nodes()
        assert (
            samples["mesh_nodes"][(("state", "ready"),)]
            == sum(n.state == "ready" for n in nodes)
            == 2
        )
        assert samples["mesh_agent_sessions"][()] == 2
        jobs = client.jobs()
        succeeded = sum(j.tasks.get("succeeded", 0) for j in jobs)
        pending = sum(j.tasks.get("pending", 0) for j in jobs)
        assert samples["mesh_tasks"][(("state", "succeeded"),)] == succeeded == 5
        assert samples["mesh_tasks"][(("state", "pending"),)] == pending == 1
        assert samples["mesh_queue_depth"][()] == 1
        assert samples["mesh_task_duration_seconds_count"][()] == 5
        # From the start the coordinator heard of to the end it heard of: a little under the
        # sleep when the start came late, never nothing.
        assert samples["mesh_task_duration_seconds_sum"][()] > 5 * 0.1
        assert samples["mesh_scheduling_round_seconds_count"][()] >= 1
        assert samples["mesh_store_write_seconds_count"][()] >= 2
        assert samples["mesh_reassignments_total"][()] == 0
        assert "mesh_heartbeats_total" in samples

        # Nothing without a credential.
        ca = load_client_config(mesh.client_config).ca.read_bytes()
        with httpx.Client(base_url=mesh.url, verify=client_ssl_context(ca)) as anonymous:
            assert anonymous.get("/metrics").status_code == 401
