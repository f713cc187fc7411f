"""Start a mesh by hand, as on three machines, and with `mesh up`; every command is the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from helpers import wait_for

from planetary_mesh.config import CoordinatorPaths

pytestmark = pytest.mark.e2e

MESH = [sys.executable, "-m", "planetary_mesh"]


def _cli(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    env.pop("MESH_CONFIG", None)
    if config is not None:
        env["MESH_CONFIG"] = str(config)
    return subprocess.run([*MESH, *args], capture_output=True, text=True, env=env, timeout=60)


@contextmanager
def _daemon(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen([*MESH, *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ready_nodes(config: Path) -> list[dict[str, object]]:
    done = _cli("nodes", "-o", "json", config=config)
    if done.returncode != 0:
        return []
    return [n for n in json.loads(done.stdout) if n["state"] == "ready"]


def test_init_coordinator_token_agent_and_an_agent_restart_needs_no_token(tmp_path: Path) -> None:
    home = tmp_path / "coordinator"
    init = _cli("init", "--data-dir", str(home), "--host", "127.0.0.1")
    assert init.returncode == 0, init.stderr
    config = home / "client.toml"
    assert config.exists()
    assert (home / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    paths = CoordinatorPaths(home)
    coordinator_args = ["coordinator", "--data-dir", str(home), "--listen", "127.0.0.1:0"]
    with _daemon(coordinator_args, tmp_path / "coordinator.log"):
        wait_for(paths.url_file.exists, 30, "the coordinator to listen")
        url = paths.url_file.read_text().strip()
        token = _cli("token", "create", "--ttl", "10m", config=config).stdout.strip()
        assert token.startswith("PMTKN-1-")
        agent_dir = tmp_path / "agent"
        agent_args = ["agent", "--coordinator", url, "--data-dir", str(agent_dir), "--cpus", "1"]
        with _daemon([*agent_args, "--token", token, "--name", "laptop"], tmp_path / "a1.log"):
            wait_for(lambda: len(_ready_nodes(config)) == 1, 30, "the agent to join")
        (node,) = json.loads(_cli("nodes", "-o", "json", config=config).stdout)
        assert node["name"] == "laptop" and str(node["id"]).startswith("n-")
        assert node["cpus"] == 1
        # A restart uses the stored certificate: no token, same node id.
        with _daemon(agent_args, tmp_path / "a2.log"):
            wait_for(lambda: len(_ready_nodes(config)) == 1, 30, "the agent to reconnect")
            assert [n["id"] for n in _ready_nodes(config)] == [node["id"]]
            run = _cli("run", "--", "sh", "-c", "echo on $MESH_JOB_ID", config=config)
            assert run.returncode == 0 and run.stdout.startswith("on ")
        # The single-use token is spent: a second machine cannot join with it.
        other = _cli(
            "agent", "--coordinator", url, "--token", token, "--data-dir", str(tmp_path / "b")
        )
        assert other.returncode == 1
        assert "used up" in other.stderr and "Traceback" not in other.stderr


def test_mesh_up_runs_work_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    root = tmp_path / "up"
    args = ["up", "--agents", "2", "--data-dir", str(root), "--listen", "127.0.0.1:0"]
    with _daemon(args, tmp_path / "up.log") as up:
        config = root / "client.toml"
        wait_for(lambda: "Ctrl-C" in (tmp_path / "up.log").read_text(), 60, "mesh up to start")
        assert len(_ready_nodes(config)) == 2
        run = _cli("run", "--", "echo", "hello", config=config)
        assert run.returncode == 0 and run.stdout == "hello\n"
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 3  # coordinator and two agents
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=30) == 0
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left running: {alive}"


def test_a_local_mesh_stops_cleanly_while_agents_hold_sessions(tmp_path: Path) -> None:
    from planetary_mesh.testing import LocalMesh

    # Stopped together, the agents close their sessions while the coordinator shuts down: that
    # once made the coordinator's shutdown crash (exit 1) instead of ending cleanly.
    for round_ in range(3):
        mesh = LocalMesh(tmp_path / f"m{round_}", agents=3, agent_cpus=1)
        mesh.start()
        mesh.stop()
        clean = (0, -signal.SIGTERM)
        assert all(code in clean for code in mesh.exit_codes.values()), mesh.exit_codes
