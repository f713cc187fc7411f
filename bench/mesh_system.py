"""Planetary Mesh as it ships: a coordinator and two agents of one CPU each, real processes on
loopback, mutual TLS, SQLite with synchronous=FULL, every task in a bubblewrap sandbox (warm
sandboxes on, the default)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from bench import tasks
from bench.common import SPIN_SOURCE, NotWithin, kill, peak_rss, tree_rss, wait_until
from planetary_mesh.client import Client, MeshExecutor
from planetary_mesh.protocol import JobSubmit
from planetary_mesh.testing import LocalMesh

UNPLACEABLE = 1024**4  # more memory than any node offers: the tasks stay pending


class MeshSystem:
    name = "mesh"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.local: LocalMesh | None = None
        self.client: Client | None = None
        # What a scenario that missed saw (the task's attempts, the nodes' states): with the
        # processes' logs, which the round then keeps, it is what a rare miss leaves to study.
        self.anomalies: list[str] = []

    def start(self) -> None:
        self.local = LocalMesh(self.root, agents=2, agent_cpus=1)
        self.local.start()
        self.client = self.local.client()

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.local is not None:
            self.local.stop()

    # -- helpers ----------------------------------------------------------------------------

    @property
    def _c(self) -> Client:
        assert self.client is not None
        return self.client

    @property
    def _mesh(self) -> LocalMesh:
        assert self.local is not None
        return self.local

    def _run(self, argv: list[str], count: int) -> float:
        """Submit one job and wait for its end (one request, as Dask's submit and result are one
        round trip); seconds from submit to the last result."""
        started = time.perf_counter()
        done = self._c.run(JobSubmit(name="bench", argv=argv, count=count))
        took = time.perf_counter() - started
        if done.tasks["succeeded"] != count:
            ok = done.tasks["succeeded"]
            raise RuntimeError(f"mesh job {done.id}: only {ok}/{count} succeeded")
        return took

    # -- scenarios --------------------------------------------------------------------------

    def footprint(self) -> int:
        mesh = self._mesh
        assert mesh.coordinator is not None
        return tree_rss([mesh.coordinator.pid, *(a.pid for a in mesh.agents)])

    def commands(self, count: int) -> float:
        return self._run(["/bin/true"], count)

    def latency(self, count: int) -> list[float]:
        samples = []
        for _ in range(count):
            samples.append(self._run(["/bin/true"], 1))
        return samples

    def functions(self, count: int) -> float:
        """``count`` no-op calls through MeshExecutor.map, one task each (no chunksize), once
        its workers are up (as Dask's and Ray's are)."""
        with MeshExecutor(self._c, name="bench-functions") as executor:
            list(executor.map(tasks.noop, range(4)))
            started = time.perf_counter()
            list(executor.map(tasks.noop, range(count)))
            return time.perf_counter() - started

    def function_latency(self, count: int) -> list[float]:
        with MeshExecutor(self._c, name="bench-function-latency") as executor:
            executor.submit(tasks.noop).result()
            samples = []
            for _ in range(count):
                started = time.perf_counter()
                executor.submit(tasks.noop).result()
                samples.append(time.perf_counter() - started)
            return samples

    def cpu_bound(self, count: int, loops: int) -> float:
        code = SPIN_SOURCE.format(n=loops)
        return self._run(["/usr/bin/python3", "-S", "-c", code], count)

    def serial_cpu(self, count: int, loops: int) -> float:
        """The CPU-bound work done one command after another on this machine, unsandboxed:
        the mesh's serial baseline (the same interpreter and start-up as its tasks pay)."""
        code = SPIN_SOURCE.format(n=loops)
        started = time.perf_counter()
        for _ in range(count):
            subprocess.run(["/usr/bin/python3", "-S", "-c", code], check=True)
        return time.perf_counter() - started

    def _running_on(self, job_id: str, attempt: int) -> int | None:
        """The agent (0-based) running the job's one task in ``attempt`` or later, if any."""
        job = self._c.job(job_id)
        assert job.task_list is not None
        task = job.task_list[0]
        if task.state != "running" or task.attempts < attempt or task.node is None:
            return None
        names = {n.id: n.name for n in self._c.nodes()}
        return int(names[task.node].rsplit("-", 1)[1]) - 1

    def _rerun_after(self, harm: str, cap: float) -> tuple[float, int]:
        job = self._c.submit(JobSubmit(name=f"bench-{harm}", argv=["sleep", "2"]))
        deadline = time.monotonic() + 30
        while (index := self._running_on(job.id, 1)) is None:
            if time.monotonic() > deadline:
                raise NotWithin("the task did not start within 30 s")
            time.sleep(0.01)
        proc = self._mesh.agents[index]
        hit = time.perf_counter()
        if harm == "kill":
            self._mesh.kill_agent(index)
        else:
            kill(proc.pid, signal.SIGSTOP)
        try:
            try:
                wait_until(
                    lambda: self._running_on(job.id, 2) is not None, cap, "the rerun", step=0.01
                )
                rerun = time.perf_counter() - hit
            except NotWithin:
                rerun = float("inf")
                self.anomalies.append(f"{harm}: no rerun within {cap:g} s; {self._seen(job.id)}")
            done = self._c.wait(job.id, timeout=cap)
            lost = 1 - done.tasks["succeeded"]
            if lost:
                ended = done.state in ("failed", "cancelled")
                how = f"the job {done.state}" if ended else f"none within {cap:g} s"
                self.anomalies.append(f"{harm}: no result ({how}); {self._seen(job.id)}")
        finally:
            if harm == "kill":
                self._mesh.restart_agent(index)
            else:
                kill(proc.pid, signal.SIGCONT)
            self._mesh.wait_ready(2)
        return rerun, lost

    def _seen(self, job_id: str) -> str:
        job = self._c.job(job_id)
        assert job.task_list is not None
        task = job.task_list[0]
        history = "; ".join(
            f"attempt on {a.node}: {a.state}" + (f" ({a.reason})" if a.reason else "")
            for a in task.history or []
        )
        nodes = ", ".join(f"{n.name} ({n.id}) {n.state}" for n in self._c.nodes())
        return (
            f"task {task.state} on {task.node}, {task.attempts} attempts ({history});"
            f" nodes: {nodes}"
        )

    def kill_rerun(self, cap: float) -> tuple[float, int]:
        return self._rerun_after("kill", cap)

    def freeze_rerun(self, cap: float) -> tuple[float, int]:
        return self._rerun_after("freeze", cap)

    def restart(self, count: int, finish: bool) -> tuple[float, float, float | None]:
        """kill -9 the coordinator while a job of ``count`` tasks is under way, start it
        again: seconds until it serves again, until tasks finish again, and (``finish``) until
        the whole job is done, every task succeeded once."""
        job = self._c.submit(JobSubmit(name="bench-restart", argv=["/bin/true"], count=count))
        wait_until(lambda: self._c.job(job.id, tasks=False).tasks["succeeded"] > 0, 60, "work")
        self._mesh.kill_coordinator()
        hit = time.perf_counter()
        self._mesh.start_coordinator()  # returns once it listens again
        serving = time.perf_counter() - hit
        self._c.close()
        self.client = self._mesh.client()
        before = self._c.job(job.id, tasks=False).tasks["succeeded"]
        wait_until(
            lambda: self._c.job(job.id, tasks=False).tasks["succeeded"] > before, 120, "progress"
        )
        resumed = time.perf_counter() - hit
        finished = None
        if finish:
            done = self._c.wait(job.id)
            finished = time.perf_counter() - hit
            if done.tasks["succeeded"] != count:
                raise RuntimeError(f"after the restart only {done.tasks['succeeded']}/{count}")
        else:
            self._c.cancel(job.id)
        self._mesh.wait_ready(2)
        return serving, resumed, finished

    def pending_memory(self, count: int) -> int:
        """The coordinator's resident memory holding ``count`` pending tasks."""
        job = self._c.submit(
            JobSubmit(name="bench-pending", argv=["/bin/true"], count=count, memory=UNPLACEABLE)
        )
        try:
            assert self._mesh.coordinator is not None
            pid = self._mesh.coordinator.pid
            return peak_rss([pid], seconds=2.0)  # over a few scheduling rounds of the queue
        finally:
            self._c.cancel(job.id)
