"""Kill or freeze the worker running a marked task and time until the task starts again."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import NotWithin, kill, wait_until


def starts(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(line.split()[0]) for line in path.read_text().splitlines() if line.strip()]


def harm_and_time(
    path: Path, harm: str, cap: float, result: Callable[[float], object]
) -> tuple[float, int]:
    """Wait for the task's first start, kill -9 or SIGSTOP its process, time the second start;
    then ask for the result (``result(timeout)``): 0 results lost if it comes."""
    wait_until(lambda: len(starts(path)) >= 1, 60, "the task to start")
    pid = starts(path)[0]
    hit = time.perf_counter()
    kill(pid, signal.SIGKILL if harm == "kill" else signal.SIGSTOP)
    try:
        try:
            wait_until(lambda: len(starts(path)) >= 2, cap, "the rerun", step=0.01)
            rerun = time.perf_counter() - hit
        except NotWithin:
            rerun = float("inf")
        try:
            result(cap)
            lost = 0
        except Exception:  # any failure to deliver is a lost result
            lost = 1
    finally:
        if harm == "freeze":
            kill(pid, signal.SIGCONT)
    return rerun, lost
