"""No silent downgrade: without bwrap an agent refuses to run tasks unless told --no-sandbox, and
then it warns and the node shows as unsandboxed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_for

from planetary_mesh.config import CoordinatorPaths
from planetary_mesh.coordinator.bootstrap import init_mesh

pytestmark = pytest.mark.e2e

MESH = [sys.executable, "-m", "planetary_mesh"]


def test_an_agent_without_bwrap_refuses_unless_told_and_then_says_so(tmp_path: Path) -> None:
    home = tmp_path / "coordinator"
    init_mesh(CoordinatorPaths(home), home / "client.toml", ["127.0.0.1"])
    config = ["--config", str(home / "client.toml")]
    coordinator = subprocess.Popen(
        [*MESH, "coordinator", "--data-dir", str(home), "--listen", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    agent: subprocess.Popen[str] | None = None
    try:
        url_file = CoordinatorPaths(home).url_file
        wait_for(url_file.exists, 30, "the coordinator to listen")
        url = url_file.read_text().strip()
        token = subprocess.run(
            [*MESH, "token", "create", "--uses", "2", *config],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        # A PATH without bwrap, as on a host that lacks it.
        no_bwrap = {**os.environ, "PATH": str(tmp_path / "empty")}
        args = [*MESH, "agent", "--coordinator", url, "--token", token, "--cpus", "1"]
        refused = subprocess.run(
            [*args, "--data-dir", str(tmp_path / "a1")],
            env=no_bwrap, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode == 1
        assert "bubblewrap (bwrap) is not installed" in refused.stderr
        assert "--no-sandbox" in refused.stderr and "Traceback" not in refused.stderr

        log = tmp_path / "agent.log"
        with log.open("w") as out:
            agent = subprocess.Popen(
                [*args, "--data-dir", str(tmp_path / "a2"), "--no-sandbox"],
                env=no_bwrap, stdout=out, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip

        def nodes() -> str:
            return subprocess.run(
                [*MESH, "nodes", "-o", "json", *config], capture_output=True, text=True
            ).stdout

        wait_for(lambda: '"ready"' in nodes(), 30, "the unsandboxed agent to join")
        assert "none (UNSANDBOXED: --no-sandbox)" in nodes()
        assert "RUNNING TASKS WITHOUT A SANDBOX" in log.read_text()
    finally:
        for proc in (agent, coordinator):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
