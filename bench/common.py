"""What every system's scenarios share: the workload sizes, timing, percentiles, memory."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

MIB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    """How much work each scenario does; `--smoke` shrinks it to seconds."""

    commands: int = 2000
    latency: int = 200
    functions: int = 2000  # no-op Python calls in one map
    function_latency: int = 200  # no-op Python calls, one after another
    large_array: int = 10_000
    cpu_tasks: int = 16
    cpu_seconds: float = 0.5
    pending: int = 100_000
    rerun_cap: float = 30.0  # past this, a kill or freeze is reported as "not within the cap"
    scale_agents: int = 1000  # simulated agents (mesh only)
    scale_window: float = 20.0  # seconds of heartbeats alone, for the coordinator's CPU share
    scale_probes: int = 200  # one-task jobs, one after another, for scheduling latency

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(
            commands=20, latency=10, functions=20, function_latency=10, large_array=50,
            cpu_tasks=4, cpu_seconds=0.05,
            pending=1000, rerun_cap=30.0, scale_agents=20, scale_window=2.0, scale_probes=10,
        )  # fmt: skip


class NotWithin(Exception):
    """A scenario's event did not happen within its cap (a frozen worker never replaced)."""


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, step: float = 0.005
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise NotWithin(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(step)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def tree_rss(pids: list[int]) -> int:
    """Resident memory of these processes and all their descendants, counted once each."""
    seen: dict[int, int] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                seen.setdefault(proc.pid, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            continue
    return sum(seen.values())


def peak_rss(pids: list[int], seconds: float) -> int:
    """The most ``tree_rss`` reads over ``seconds`` (a reading every 0.1 s)."""
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, tree_rss(pids))
        time.sleep(0.1)
    return peak


def spin(n: int) -> int:
    """Pure computation, the same in every system: the CPU-bound scenario's task."""
    x = 0
    for i in range(n):
        x += i * i % 7
    return x


# The same loop as spin(), in a function as there (module-level code runs slower on globals).
SPIN_SOURCE = (
    "def spin(n):\n    x = 0\n    for i in range(n):\n        x += i * i % 7\n    return x\n"
    "spin({n})\n"
)


def calibrate_spin(seconds: float) -> int:
    """The loop count that takes about ``seconds`` of one core here."""
    n = 100_000
    while True:
        started = time.perf_counter()
        spin(n)
        took = time.perf_counter() - started
        if took > 0.05:
            return max(1, int(n * seconds / took))
        n *= 4


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
