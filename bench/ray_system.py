"""Ray on one machine as `ray.init(num_cpus=2)` makes it: GCS, raylet and two worker processes,
the driver in the benchmark's process."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench import tasks
from bench.common import tree_rss
from bench.rerun import harm_and_time

ROOT = Path(__file__).resolve().parents[1]


class RaySystem:
    name = "ray"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.remote: dict[str, Any] = {}

    def start(self) -> None:
        import ray

        os.environ["PYTHONPATH"] = str(ROOT)  # the workers import bench.tasks
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        for name in ("run_true", "noop", "spin_task", "marked_sleep"):
            self.remote[name] = ray.remote(getattr(tasks, name))
        ray.get([self.remote["noop"].remote() for _ in range(4)])  # workers up

    def stop(self) -> None:
        import ray

        ray.shutdown()

    def footprint(self) -> int:
        me = psutil.Process()
        return tree_rss([c.pid for c in me.children()])

    def commands(self, count: int) -> float:
        import ray

        started = time.perf_counter()
        ray.get([self.remote["run_true"].remote(i) for i in range(count)])
        return time.perf_counter() - started

    def latency(self, count: int) -> list[float]:
        import ray

        samples = []
        for _ in range(count):
            started = time.perf_counter()
            ray.get(self.remote["noop"].remote())
            samples.append(time.perf_counter() - started)
        return samples

    def functions(self, count: int) -> float:
        import ray

        started = time.perf_counter()
        ray.get([self.remote["noop"].remote(i) for i in range(count)])
        return time.perf_counter() - started

    def function_latency(self, count: int) -> list[float]:
        return self.latency(count)  # its latency scenario is a no-op Python call already

    def cpu_bound(self, count: int, loops: int) -> float:
        import ray

        started = time.perf_counter()
        ray.get([self.remote["spin_task"].remote(loops) for _ in range(count)])
        return time.perf_counter() - started

    def _harm(self, harm: str, cap: float) -> tuple[float, int]:
        import ray

        mark = Path(tempfile.mkdtemp()) / "starts"
        ref = self.remote["marked_sleep"].remote(str(mark), 2.0)
        return harm_and_time(mark, harm, cap, lambda timeout: ray.get(ref, timeout=timeout))

    def kill_rerun(self, cap: float) -> tuple[float, int]:
        return self._harm("kill", cap)

    def freeze_rerun(self, cap: float) -> tuple[float, int]:
        return self._harm("freeze", cap)
