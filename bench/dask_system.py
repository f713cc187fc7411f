"""Dask distributed as people deploy it on a LAN: `dask scheduler` and two `dask worker`s
(one process, one thread each, with their nannies), the client in the benchmark's process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import tasks
from bench.common import kill, tree_rss, wait_until
from bench.rerun import harm_and_time

ROOT = Path(__file__).resolve().parents[1]


class DaskSystem:
    name = "dask"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.client: Any = None

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = (self.root / f"dask-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=log, stderr=log
        )
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        from distributed import Client

        self.root.mkdir(parents=True, exist_ok=True)
        scheduler_file = self.root / "scheduler.json"
        self._spawn(
            "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
            "--scheduler-file", str(scheduler_file), "--no-dashboard",
        )  # fmt: skip
        wait_until(scheduler_file.exists, 60, "the Dask scheduler")
        for i in range(2):
            self._spawn(
                "distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file),
                "--nthreads", "1", "--nworkers", "1", "--no-dashboard", "--memory-limit", "0",
                "--name", f"w{i}",
            )  # fmt: skip
        self.client = Client(scheduler_file=str(scheduler_file))
        self.client.wait_for_workers(2, timeout=60)

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        for proc in self.procs:
            for child in _children(proc.pid):
                kill(child)
            proc.kill()
            proc.wait()

    @property
    def _c(self) -> Any:
        return self.client

    def footprint(self) -> int:
        return tree_rss([p.pid for p in self.procs])

    def commands(self, count: int) -> float:
        started = time.perf_counter()
        self._c.gather(self._c.map(tasks.run_true, range(count), pure=False))
        return time.perf_counter() - started

    def latency(self, count: int) -> list[float]:
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            self._c.submit(tasks.noop, pure=False).result()
            samples.append(time.perf_counter() - started)
        return samples

    def functions(self, count: int) -> float:
        started = time.perf_counter()
        self._c.gather(self._c.map(tasks.noop, range(count), pure=False))
        return time.perf_counter() - started

    def function_latency(self, count: int) -> list[float]:
        return self.latency(count)  # its latency scenario is a no-op Python call already

    def cpu_bound(self, count: int, loops: int) -> float:
        started = time.perf_counter()
        self._c.gather(self._c.map(tasks.spin_task, [loops] * count, pure=False))
        return time.perf_counter() - started

    def _harm(self, harm: str, cap: float) -> tuple[float, int]:
        mark = Path(tempfile.mkdtemp()) / "starts"
        future = self._c.submit(tasks.marked_sleep, str(mark), 2.0, pure=False)
        rerun, lost = harm_and_time(mark, harm, cap, lambda timeout: future.result(timeout))
        self._c.wait_for_workers(2, timeout=60)
        return rerun, lost

    def kill_rerun(self, cap: float) -> tuple[float, int]:
        return self._harm("kill", cap)

    def freeze_rerun(self, cap: float) -> tuple[float, int]:
        return self._harm("freeze", cap)


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
