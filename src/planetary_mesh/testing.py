"""LocalMesh: a coordinator and N agents as real processes on loopback, with a throwaway CA.

`mesh up` is built on it, and so are the end-to-end tests. Every process it starts is ended by
pid when it stops, whatever happened in between.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from planetary_mesh.client import Client
from planetary_mesh.config import CoordinatorPaths, load_client_config
from planetary_mesh.coordinator.bootstrap import init_mesh
from planetary_mesh.errors import MeshError
from planetary_mesh.sandbox.limits import reap_stale_task_cgroups

START_TIMEOUT = 30.0


class LocalMesh:
    def __init__(
        self,
        data_dir: Path,
        agents: int = 3,
        listen: str = "127.0.0.1:0",
        agent_cpus: float | None = None,
        agent_memory: str | None = None,
        log_dir: Path | None = None,
        coordinator_args: tuple[str, ...] = (),
        agent_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = data_dir
        self.paths = CoordinatorPaths(data_dir)
        self.client_config = data_dir / "client.toml"
        self.agent_count = agents
        self.listen = listen
        self.agent_cpus = agent_cpus
        self.agent_memory = agent_memory
        self.log_dir = log_dir or data_dir / "logs"
        self.coordinator_args = coordinator_args
        self.agent_args = agent_args
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.exit_codes: dict[str, int | None] = {}  # of the processes the last stop() ended
        self.agents: list[subprocess.Popen[bytes]] = []
        self.url = ""

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        try:
            if not self.paths.ca_key.exists():
                init_mesh(self.paths, self.client_config, ["127.0.0.1", "localhost", "::1"])
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.start_coordinator()
            token = None
            if any(
                not self.agent_dir(i).joinpath("agent.toml").exists()
                for i in range(self.agent_count)
            ):
                with self.client() as client:
                    token = client.create_token(ttl=600, uses=self.agent_count)
            for i in range(self.agent_count):
                self.agents.append(self._start_agent(i, token))
            self.wait_ready(self.agent_count)
        except BaseException:
            self.stop()
            raise

    def start_coordinator(self) -> None:
        self.paths.url_file.unlink(missing_ok=True)
        self.coordinator = self._spawn(
            "coordinator",
            [
                "coordinator",
                "--data-dir",
                str(self.data_dir),
                "--listen",
                self._listen_now(),
                *self.coordinator_args,
            ],
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.paths.url_file.exists():
            if self.coordinator.poll() is not None:
                raise MeshError(
                    f"the coordinator exited with {self.coordinator.returncode}; "
                    f"see {self.log_dir / 'coordinator.log'}"
                )
            if time.monotonic() > deadline:
                raise MeshError("the coordinator did not start listening within 30 s")
            time.sleep(0.02)
        self.url = self.paths.url_file.read_text().strip()

    def _listen_now(self) -> str:
        # After a restart, reuse the port the agents know, so they can reconnect by themselves.
        if self.url:
            return self.url.removeprefix("https://")
        return self.listen

    def agent_dir(self, i: int) -> Path:
        return self.data_dir / "agents" / f"agent-{i + 1}"

    def _start_agent(self, i: int, token: str | None) -> subprocess.Popen[bytes]:
        args = [
            "agent",
            "--coordinator",
            self.url,
            "--data-dir",
            str(self.agent_dir(i)),
            "--name",
            f"agent-{i + 1}",
        ]
        if token and not self.agent_dir(i).joinpath("agent.toml").exists():
            args += ["--token", token]
        if self.agent_cpus is not None:
            args += ["--cpus", str(self.agent_cpus)]
        if self.agent_memory is not None:
            args += ["--memory", self.agent_memory]
        args += self.agent_args
        return self._spawn(f"agent-{i + 1}", args)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("MESH_CONFIG", None)
        return subprocess.Popen(
            [sys.executable, "-m", "planetary_mesh", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def wait_ready(self, count: int, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                try:
                    ready = [n for n in client.nodes() if n.state == "ready"]
                    if len(ready) >= count:
                        return
                except MeshError:
                    pass
                for proc in self.agents:
                    if proc.poll() is not None:
                        raise MeshError(
                            f"an agent exited with {proc.returncode}; "
                            f"see the logs in {self.log_dir}"
                        )
                if time.monotonic() > deadline:
                    raise MeshError(f"{count} agents did not become ready within {timeout:.0f} s")
                time.sleep(0.05)

    def client(self) -> Client:
        return Client(load_client_config(self.client_config))

    def kill_agent(self, i: int) -> None:
        """kill -9 agent ``i``; whatever of its tasks outlived it is swept up too."""
        proc = self.agents[i]
        proc.kill()
        proc.wait()
        reap_stale_task_cgroups(proc.pid)

    def restart_agent(self, i: int) -> None:
        """Start agent ``i`` again from its data dir: it rejoins with its stored certificate."""
        if self.agents[i].poll() is None:
            raise MeshError(f"agent {i + 1} is still running")
        self.agents[i] = self._start_agent(i, None)

    def kill_coordinator(self) -> None:
        """kill -9: no chance to clean up, as in a crash."""
        if self.coordinator is not None:
            self.coordinator.kill()
            self.coordinator.wait()

    def stop(self) -> None:
        for proc in [*self.agents, self.coordinator]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.agents, self.coordinator]:
            if proc is None:
                continue
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc in self.agents:
            reap_stale_task_cgroups(proc.pid)
        self.exit_codes = {
            name: proc.returncode
            for name, proc in [("coordinator", self.coordinator)]
            + [(f"agent-{i + 1}", a) for i, a in enumerate(self.agents)]
            if proc is not None
        }
        self.agents = []
        self.coordinator = None

    def __enter__(self) -> LocalMesh:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
