"""What this machine offers: CPUs and memory, from psutil unless the owner caps them."""

from __future__ import annotations

import psutil


def detect_cpus() -> float:
    return float(psutil.cpu_count(logical=True) or 1)


def detect_memory() -> int:
    return int(psutil.virtual_memory().total)
