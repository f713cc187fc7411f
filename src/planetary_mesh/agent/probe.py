"""What this machine offers (CPUs, memory, GPUs) and what it is doing now, from psutil and,
where NVIDIA's library is installed, NVML."""

from __future__ import annotations

import time
from typing import Any

import psutil


def detect_cpus() -> float:
    return float(psutil.cpu_count(logical=True) or 1)


def detect_memory() -> int:
    return int(psutil.virtual_memory().total)


def detect_gpus() -> int:
    """NVIDIA GPUs NVML sees; 0 without nvidia-ml-py or a driver (the common case)."""
    try:
        import pynvml  # type: ignore[import-not-found]  # nvidia-ml-py, optional
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return 0


class UsageSampler:
    """The machine's CPU and memory use for the dashboard, sampled at most once a second
    (an agent reporting many results a second should not read /proc for each)."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self._at = -every
        self._last: dict[str, Any] = {}
        psutil.cpu_percent(interval=None)  # the first call only starts the measurement

    def sample(self) -> dict[str, Any]:
        now = time.monotonic()
        if now - self._at >= self.every:
            self._at = now
            self._last = {
                "cpu_percent": min(100.0, float(psutil.cpu_percent(interval=None))),
                "memory_in_use": int(psutil.virtual_memory().used),
            }
        return self._last
