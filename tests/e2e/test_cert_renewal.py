"""Certificates that change under a running mesh, with real processes: an agent renews its
short-lived certificate over the current one (no token) and keeps working; an expired one is
refused at the TLS handshake and the agent says what to do; the coordinator's server
certificate is rotated without a restart."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from helpers import wait_for, wait_job

from planetary_mesh.config import AgentPaths
from planetary_mesh.pki import certs
from planetary_mesh.pki.tls import client_ssl_context
from planetary_mesh.protocol import JobSubmit
from planetary_mesh.testing import LocalMesh

pytestmark = pytest.mark.e2e

LIFETIME_S = 3.0


def _serial(paths: AgentPaths) -> int:
    return certs.load_cert_pem(paths.cert.read_bytes()).serial_number


def test_an_agent_renews_its_certificate_and_an_expired_one_is_refused(tmp_path: Path) -> None:
    lifetime = ("--node-cert-lifetime", f"{LIFETIME_S:g}s")
    with LocalMesh(tmp_path, agents=1, agent_cpus=1, coordinator_args=lifetime) as mesh:
        paths = AgentPaths(mesh.agent_dir(0))
        first = certs.load_cert_pem(paths.cert.read_bytes())
        span = first.not_valid_after_utc - first.not_valid_before_utc - certs.CLOCK_SKEW
        assert abs(span.total_seconds() - LIFETIME_S) < 1.5, span
        seen = {first.serial_number}
        with mesh.client() as client:
            job = client.submit(JobSubmit(argv=["sleep", "0.5"], count=12))

            # Each renewal is due at 50-80 % of the lifetime: three within ~3 lifetimes.
            def renewed_three_times() -> bool:
                seen.add(_serial(paths))
                return len(seen) >= 4

            wait_for(renewed_three_times, 4 * LIFETIME_S, "three renewals")
            assert wait_job(client, job.id, timeout=30).state == "succeeded"
            assert [n.state for n in client.nodes()] == ["ready"]
            renewed = certs.load_cert_pem(paths.cert.read_bytes())
            assert certs.identity_of(renewed).name == certs.identity_of(first).name  # same node
            # A new session is made with the renewed certificate (the first one expired long ago).
            assert time.time() > first.not_valid_after_utc.timestamp()

            # Stop it just after a renewal, so that what it restarts with is still valid for
            # its start-up (a 3 s certificate stopped late in its life expires meanwhile).
            def freshly_renewed() -> bool:
                left = certs.load_cert_pem(paths.cert.read_bytes()).not_valid_after_utc
                return left.timestamp() - time.time() > 2.0

            wait_for(freshly_renewed, 4 * LIFETIME_S, "a fresh renewal")
            mesh.agents[0].terminate()
            mesh.agents[0].wait(10)
            mesh.restart_agent(0)
            wait_for(
                lambda: [n.state for n in client.nodes()] == ["ready"],
                20,
                "the restarted agent's session",
            )

            # The contrast for the refusal below: a valid certificate of this node (made here
            # with the CA, an hour long, so no renewal races it) gets an HTTP answer, a 403
            # (agents may not call user endpoints).
            ca = certs.load_cert_pem(mesh.paths.ca_cert.read_bytes())
            ca_key = certs.load_key_pem(mesh.paths.ca_key.read_bytes())
            key = certs.generate_key()
            node_id = certs.identity_of(first).name
            csr = certs.make_csr(key, "contrast")
            hour = certs.sign_node_csr(ca, ca_key, csr, node_id, timedelta(hours=1))
            certs.write_public_file(tmp_path / "hour.pem", certs.cert_to_pem(hour))
            certs.write_private_file(tmp_path / "hour-key.pem", certs.key_to_pem(key))
            valid = client_ssl_context(
                paths.ca_cert.read_bytes(), tmp_path / "hour.pem", tmp_path / "hour-key.pem"
            )
            with httpx.Client(base_url=mesh.url, verify=valid, timeout=10) as http:
                assert http.get("/v1/nodes").status_code == 403

            # Stopped for longer than its certificate lives, an agent is refused and says why.
            mesh.agents[0].terminate()
            mesh.agents[0].wait(10)
            expired = certs.load_cert_pem(paths.cert.read_bytes())
            wait_for(
                lambda: time.time() > expired.not_valid_after_utc.timestamp() + 0.5,
                2 * LIFETIME_S,
                "the certificate to expire",
            )
            # The TLS layer refuses it: no HTTP answer at all (under TLS 1.3 the refusal comes
            # on the first read), where the valid one above got its answer.
            context = client_ssl_context(paths.ca_cert.read_bytes(), paths.cert, paths.key)
            with (
                httpx.Client(base_url=mesh.url, verify=context, timeout=10) as http,
                pytest.raises(httpx.TransportError),
            ):
                http.get("/v1/nodes")
            mesh.restart_agent(0)
            assert mesh.agents[0].wait(20) != 0
            log = (mesh.log_dir / "agent-1.log").read_text()
            assert "certificate expired" in log and "new token" in log, log[-1500:]


def _served_serial(mesh: LocalMesh) -> int:
    """The serial of the certificate a new TLS handshake with the coordinator gets."""
    host, port = mesh.url.removeprefix("https://").rsplit(":", 1)
    pem = ssl.get_server_certificate((host, int(port)), timeout=10)
    return certs.load_cert_pem(pem.encode()).serial_number


def test_the_server_certificate_rotates_without_a_restart(tmp_path: Path) -> None:
    with LocalMesh(tmp_path, agents=1, agent_cpus=1) as mesh, mesh.client() as client:
        coordinator = mesh.coordinator
        assert coordinator is not None
        before = _served_serial(mesh)
        rotated = subprocess.run(
            [sys.executable, "-m", "planetary_mesh", "rotate-server-cert",
             "--data-dir", str(mesh.data_dir)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert rotated.returncode == 0, rotated.stderr
        new = certs.load_cert_pem(mesh.paths.server_cert.read_bytes()).serial_number
        assert new != before and f"serial {new:x}" in rotated.stdout
        wait_for(lambda: _served_serial(mesh) == new, 10, "the new certificate to be served")
        assert coordinator.poll() is None and mesh.coordinator is coordinator  # no restart
        # Clients and agents trust it (same CA): new connections and the old session work.
        with mesh.client() as fresh:
            assert [n.state for n in fresh.nodes()] == ["ready"]
        job = client.submit(JobSubmit(argv=["echo", "after-rotation"]))
        assert wait_job(client, job.id).state == "succeeded"
